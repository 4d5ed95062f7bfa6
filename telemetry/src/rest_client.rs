//! The API client's request metrics under client-go's names
//! (`rest_client_requests_total{code,host,method}` and
//! `rest_client_request_duration_seconds{host,verb}`), which the dashboards
//! of kube-proxy and of Kubernetes controllers chart as API request rate and
//! latency: a tower layer around the kube client's HTTP stack.
//!
//! As in client-go, a request is timed until its whole body is read (or
//! dropped), and a watch is counted but not timed. kube's client retries
//! 429, 503 and 504 answers below this layer, so only a request's last
//! answer is counted and its time includes the retries (client-go counts
//! and times every attempt).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tower::{Layer, Service};

type Labels = Vec<(String, String)>;

/// `rest_client_requests_total` and `rest_client_request_duration_seconds`.
#[derive(Debug)]
pub struct RestClientMetrics {
    requests: Family<Labels, Counter>,
    durations: Family<Labels, Histogram, fn() -> Histogram>,
}

impl Default for RestClientMetrics {
    fn default() -> Self {
        RestClientMetrics {
            requests: Family::default(),
            durations: Family::new_with_constructor(|| {
                // client-go's buckets.
                Histogram::new([
                    0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0,
                ])
            }),
        }
    }
}

impl RestClientMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "rest_client_requests",
            "Number of HTTP requests to the API server, by status code, host and method",
            self.requests.clone(),
        );
        registry.register(
            "rest_client_request_duration_seconds",
            "Request latency to the API server in seconds, by host and verb",
            self.durations.clone(),
        );
    }

    /// Counts one answer of the API server.
    pub fn count(&self, code: &str, host: &str, method: &str) {
        self.requests
            .get_or_create(&vec![
                ("code".to_string(), code.to_string()),
                ("host".to_string(), host.to_string()),
                ("method".to_string(), method.to_string()),
            ])
            .inc();
    }

    /// Records how long one request to the API server took.
    pub fn time(&self, host: &str, verb: &str, took: std::time::Duration) {
        self.durations
            .get_or_create(&vec![
                ("host".to_string(), host.to_string()),
                ("verb".to_string(), verb.to_string()),
            ])
            .observe(took.as_secs_f64());
    }
}

/// A kube client for `config` whose requests `metrics` counts and times.
pub fn client(
    config: kube::Config,
    metrics: &Arc<RestClientMetrics>,
) -> Result<kube::Client, kube::Error> {
    let host = config
        .cluster_url
        .authority()
        .map(|a| a.to_string())
        .unwrap_or_default();
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&ApiMetricsLayer::new(metrics.clone(), &host))
        .build())
}

/// Counts and times every request of the client it wraps.
#[derive(Clone)]
pub struct ApiMetricsLayer {
    metrics: Arc<RestClientMetrics>,
    /// The API server's `host:port`, as client-go labels it (requests at
    /// this layer carry only a path).
    host: Arc<str>,
}

impl ApiMetricsLayer {
    pub fn new(metrics: Arc<RestClientMetrics>, host: &str) -> Self {
        ApiMetricsLayer {
            metrics,
            host: host.into(),
        }
    }
}

impl<S> Layer<S> for ApiMetricsLayer {
    type Service = ApiMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ApiMetrics {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct ApiMetrics<S> {
    inner: S,
    layer: ApiMetricsLayer,
}

/// Whether a request is a watch (`?watch=true` or `?watch=1`).
fn is_watch(uri: &http::Uri) -> bool {
    uri.query().is_some_and(|query| {
        query
            .split('&')
            .any(|pair| matches!(pair, "watch=true" | "watch=1"))
    })
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for ApiMetrics<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = http::Response<TimedBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let method = request.method().as_str().to_string();
        let timer = (!is_watch(request.uri())).then(|| Timer {
            metrics: self.layer.metrics.clone(),
            host: self.layer.host.clone(),
            verb: method.clone(),
            started: Instant::now(),
        });
        let response = self.inner.call(request);
        let layer = self.layer.clone();
        Box::pin(async move {
            match response.await {
                Ok(response) => {
                    layer
                        .metrics
                        .count(response.status().as_str(), &layer.host, &method);
                    Ok(response.map(|inner| TimedBody {
                        inner: Box::pin(inner),
                        timer,
                    }))
                }
                Err(e) => {
                    layer.metrics.count("<error>", &layer.host, &method);
                    if let Some(timer) = timer {
                        timer.observe();
                    }
                    Err(e)
                }
            }
        })
    }
}

/// Records a request's duration once, when its body ends or is dropped.
struct Timer {
    metrics: Arc<RestClientMetrics>,
    host: Arc<str>,
    verb: String,
    started: Instant,
}

impl Timer {
    fn observe(self) {
        self.metrics
            .time(&self.host, &self.verb, self.started.elapsed());
    }
}

/// A response body that stops its request's timer at its end.
pub struct TimedBody<B> {
    inner: Pin<Box<B>>,
    timer: Option<Timer>,
}

impl<B> Drop for TimedBody<B> {
    fn drop(&mut self) {
        if let Some(timer) = self.timer.take() {
            timer.observe();
        }
    }
}

impl<B: Body> Body for TimedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let frame = self.inner.as_mut().poll_frame(cx);
        if matches!(frame, Poll::Ready(None | Some(Err(_))))
            && let Some(timer) = self.timer.take()
        {
            timer.observe();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use http_body_util::{BodyExt as _, Full};

    type Reply = http::Response<Full<hyper::body::Bytes>>;

    /// Answers every request with `status` and a small body, or fails.
    struct Answer(Option<u16>);

    impl Service<http::Request<()>> for Answer {
        type Response = Reply;
        type Error = &'static str;
        type Future = std::future::Ready<Result<Reply, &'static str>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            std::future::ready(match self.0 {
                Some(status) => Ok(http::Response::builder()
                    .status(status)
                    .body(Full::new(hyper::body::Bytes::from_static(b"{}")))
                    .unwrap()),
                None => Err("connection refused"),
            })
        }
    }

    /// Sends one request and reads its whole body, as kube's client does.
    async fn send(layer: &ApiMetricsLayer, method: &str, uri: &str, answer: Option<u16>) {
        let mut service = layer.layer(Answer(answer));
        let request = http::Request::builder()
            .method(method)
            .uri(uri)
            .body(())
            .unwrap();
        if let Ok(response) = service.call(request).await {
            let _ = response.into_body().collect().await;
        }
    }

    #[tokio::test]
    async fn requests_are_counted_by_code_host_and_method_and_timed_by_verb() {
        let metrics = Arc::new(RestClientMetrics::default());
        let layer = ApiMetricsLayer::new(metrics.clone(), "10.96.0.1:443");
        let list = "/api/v1/services?labelSelector=a";
        send(&layer, "GET", list, Some(200)).await;
        send(
            &layer,
            "GET",
            "/api/v1/services?watch=true&resourceVersion=7",
            Some(200),
        )
        .await;
        send(
            &layer,
            "POST",
            "/api/v1/namespaces/default/events",
            Some(201),
        )
        .await;
        send(&layer, "GET", list, None).await;
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            r#"rest_client_requests_total{code="200",host="10.96.0.1:443",method="GET"} 2"#,
            r#"rest_client_requests_total{code="201",host="10.96.0.1:443",method="POST"} 1"#,
            r#"rest_client_requests_total{code="<error>",host="10.96.0.1:443",method="GET"} 1"#,
            // The watch is counted, not timed.
            r#"rest_client_request_duration_seconds_count{host="10.96.0.1:443",verb="GET"} 2"#,
            r#"rest_client_request_duration_seconds_count{host="10.96.0.1:443",verb="POST"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
    }

    /// A body whose one frame comes after a delay.
    struct Slow {
        sleep: Pin<Box<tokio::time::Sleep>>,
        sent: bool,
    }

    impl Body for Slow {
        type Data = hyper::body::Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
            if self.sent {
                return Poll::Ready(None);
            }
            if self.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.sent = true;
            Poll::Ready(Some(Ok(Frame::data(hyper::body::Bytes::from_static(
                b"{}",
            )))))
        }
    }

    /// Answers 200 at once, with a body that takes `.0` to arrive.
    struct SlowAnswer(std::time::Duration);

    impl Service<http::Request<()>> for SlowAnswer {
        type Response = http::Response<Slow>;
        type Error = &'static str;
        type Future = std::future::Ready<Result<http::Response<Slow>, &'static str>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            std::future::ready(Ok(http::Response::new(Slow {
                sleep: Box::pin(tokio::time::sleep(self.0)),
                sent: false,
            })))
        }
    }

    #[tokio::test]
    async fn a_request_is_timed_until_its_body_ends_or_is_dropped() {
        let metrics = Arc::new(RestClientMetrics::default());
        let layer = ApiMetricsLayer::new(metrics.clone(), "api:443");
        let mut service = layer.layer(SlowAnswer(std::time::Duration::from_millis(100)));
        let get = |uri: &str| http::Request::get(uri).body(()).unwrap();
        // Read to its end: the time covers the body's 100 ms.
        let response = service.call(get("/api/v1/services")).await.unwrap();
        response.into_body().collect().await.unwrap();
        // Dropped unread: counted and timed once all the same.
        drop(service.call(get("/api/v1/nodes")).await.unwrap());
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let value = |name: &str| crate::sample(&text, name).unwrap_or(-1.0);
        assert_eq!(
            value(r#"rest_client_requests_total{code="200",host="api:443",method="GET"}"#),
            2.0,
            "{text}"
        );
        assert_eq!(
            value(r#"rest_client_request_duration_seconds_count{host="api:443",verb="GET"}"#),
            2.0,
            "{text}"
        );
        let took = value(r#"rest_client_request_duration_seconds_sum{host="api:443",verb="GET"}"#);
        assert!((0.1..5.0).contains(&took), "{took} s:\n{text}");
    }
}
