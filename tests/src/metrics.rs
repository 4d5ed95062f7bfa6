//! Reading Prometheus text expositions in tests and benchmarks.

/// The value of the sample named exactly `name` (labels included, as
/// written in the exposition), or `None` when it is absent or not a number.
pub fn value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(name)?
            .strip_prefix(' ')?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
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
    }
}
