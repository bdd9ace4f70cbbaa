//! Kubernetes resource quantities (`500m`, `2`, `1.5Gi`, `1e9`) as integers.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid quantity {0:?}")]
pub struct QuantityError(pub String);

/// Parses a quantity into its value scaled by `scale` (1000 for millicores, 1 for bytes),
/// rounding up as Kubernetes does for requests.
pub fn parse_scaled(text: &str, scale: f64) -> Result<u64, QuantityError> {
    let t = text.trim();
    let err = || QuantityError(text.to_string());
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(t.len());
    let (number, suffix) = t.split_at(split);
    let multiplier: f64 = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        s if s.starts_with(['e', 'E']) => {
            let exp: i32 = s[1..].parse().map_err(|_| err())?;
            10f64.powi(exp)
        }
        _ => return Err(err()),
    };
    let value: f64 = number.parse().map_err(|_| err())?;
    let v = value * multiplier * scale;
    if !v.is_finite() || v < 0.0 {
        return Err(err());
    }
    Ok(v.ceil() as u64)
}

pub fn cpu_millis(text: &str) -> Result<u64, QuantityError> {
    parse_scaled(text, 1000.0)
}

pub fn bytes(text: &str) -> Result<u64, QuantityError> {
    parse_scaled(text, 1.0)
}

/// Parses a Go duration such as `90s`, `1m30s`, `1.5h`, `250ms`.
pub fn duration(text: &str) -> Result<std::time::Duration, QuantityError> {
    let err = || QuantityError(text.to_string());
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(err());
    }
    let mut total = 0.0f64;
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(err)?;
        let value: f64 = rest[..n].parse().map_err(|_| err())?;
        rest = &rest[n..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(err()),
        };
        total += value * seconds;
        rest = &rest[unit_len..];
    }
    Ok(std::time::Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_durations() {
        assert_eq!(duration("90s").unwrap().as_secs(), 90);
        assert_eq!(duration("1m30s").unwrap().as_secs(), 90);
        assert_eq!(duration("1.5h").unwrap().as_secs(), 5400);
        assert_eq!(duration("250ms").unwrap().as_millis(), 250);
        assert!(duration("").is_err());
        assert!(duration("5 minutes").is_err());
        assert!(duration("s").is_err());
    }

    #[test]
    fn parses_the_usual_forms() {
        assert_eq!(cpu_millis("500m").unwrap(), 500);
        assert_eq!(cpu_millis("2").unwrap(), 2000);
        assert_eq!(cpu_millis("1.5").unwrap(), 1500);
        assert_eq!(bytes("1Gi").unwrap(), 1 << 30);
        assert_eq!(bytes("512Mi").unwrap(), 512 << 20);
        assert_eq!(bytes("1e9").unwrap(), 1_000_000_000);
        assert_eq!(bytes("2G").unwrap(), 2_000_000_000);
        assert!(bytes("lots").is_err());
        assert!(bytes("1Xi").is_err());
        assert!(bytes("-1").is_err());
    }
}
