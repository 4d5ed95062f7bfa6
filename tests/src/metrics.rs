//! Reading Prometheus text expositions in tests and benchmarks.

/// The value of the sample named exactly `name` with its labels, as written
/// in the exposition (`b{table="nat"}`); for a name without labels, the sum
/// of its samples over every label set (as PromQL's `sum(name)`), so that a
/// per-IP-family series adds up to the node's. `None` when there is none.
pub fn value(text: &str, name: &str) -> Option<f64> {
    let number = |rest: &str| -> Option<f64> { rest.split_whitespace().next()?.parse().ok() };
    if name.contains('{') {
        return text
            .lines()
            .find_map(|line| number(line.strip_prefix(name)?.strip_prefix(' ')?));
    }
    let samples: Vec<f64> = text
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let rest = match rest.strip_prefix('{') {
                Some(labelled) => labelled.split_once("} ")?.1,
                None => rest.strip_prefix(' ')?,
            };
            number(rest)
        })
        .collect();
    (!samples.is_empty()).then(|| samples.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_found_by_their_whole_name() {
        let text = "# TYPE a counter\na_total 3\na_total_extra 9\nb{table=\"nat\"} 12 1700000000\n";
        assert_eq!(value(text, "a_total"), Some(3.0));
        assert_eq!(value(text, "b{table=\"nat\"}"), Some(12.0));
        assert_eq!(value(text, "a"), None);
        let families = "c{ip_family=\"IPv4\"} 2\nc{ip_family=\"IPv6\"} 3\nc_sum 7\n";
        assert_eq!(value(families, "c"), Some(5.0));
        assert_eq!(value(families, "c{ip_family=\"IPv6\"}"), Some(3.0));
        assert_eq!(value(families, "c_sum"), Some(7.0));
    }
}
