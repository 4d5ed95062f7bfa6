//! The API client's request metrics under client-go's names
//! (`rest_client_requests_total{code,host,method}` and
//! `rest_client_request_duration_seconds{host,verb}`), which kube-proxy's
//! dashboards chart as "Kube API Request Rate" and request latency: a tower
//! layer around the kube client's HTTP stack.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tower::{Layer, Service};

use crate::metrics::Metrics;

/// Counts and times every request of the client it wraps.
#[derive(Clone)]
pub struct ApiMetricsLayer {
    metrics: Arc<Metrics>,
    /// The API server's `host:port`, as client-go labels it (requests at
    /// this layer carry only a path).
    host: Arc<str>,
}

impl ApiMetricsLayer {
    pub fn new(metrics: Arc<Metrics>, host: &str) -> Self {
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

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for ApiMetrics<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let method = request.method().as_str().to_string();
        let started = Instant::now();
        let response = self.inner.call(request);
        let layer = self.layer.clone();
        Box::pin(async move {
            let result = response.await;
            // A watch is timed to its response head, as client-go does.
            let code = match &result {
                Ok(response) => response.status().as_str().to_string(),
                Err(_) => "<error>".to_string(),
            };
            layer
                .metrics
                .count_api_request(&code, &layer.host, &method, started.elapsed());
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers every request with `status`, or fails.
    struct Answer(Option<u16>);

    impl Service<http::Request<()>> for Answer {
        type Response = http::Response<()>;
        type Error = &'static str;
        type Future = std::future::Ready<Result<http::Response<()>, &'static str>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            std::future::ready(match self.0 {
                Some(status) => Ok(http::Response::builder().status(status).body(()).unwrap()),
                None => Err("connection refused"),
            })
        }
    }

    async fn send(layer: &ApiMetricsLayer, method: &str, answer: Option<u16>) {
        let mut service = layer.layer(Answer(answer));
        let request = http::Request::builder()
            .method(method)
            .uri("/api/v1/services?watch=true")
            .body(())
            .unwrap();
        let _ = service.call(request).await;
    }

    #[tokio::test]
    async fn requests_are_counted_by_code_host_and_method_and_timed_by_verb() {
        let metrics = Arc::new(Metrics::new());
        let layer = ApiMetricsLayer::new(metrics.clone(), "10.96.0.1:443");
        send(&layer, "GET", Some(200)).await;
        send(&layer, "GET", Some(200)).await;
        send(&layer, "POST", Some(201)).await;
        send(&layer, "GET", None).await;
        let text = metrics.encode();
        for line in [
            r#"rest_client_requests_total{code="200",host="10.96.0.1:443",method="GET"} 2"#,
            r#"rest_client_requests_total{code="201",host="10.96.0.1:443",method="POST"} 1"#,
            r#"rest_client_requests_total{code="<error>",host="10.96.0.1:443",method="GET"} 1"#,
            r#"rest_client_request_duration_seconds_count{host="10.96.0.1:443",verb="GET"} 3"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
    }
}
