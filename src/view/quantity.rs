//! Kubernetes resource quantities (`500m`, `2`, `1.5Gi`, `1e9`) and Go durations (`90s`,
//! `1m30s`) as integers.
//!
//! Every value the API server accepts reaches these parsers, including absurd ones such as
//! `99999999999999999999h` (the CRD patterns bound the form, not the size). They therefore use
//! exact integer arithmetic with checked operations and explicit upper bounds, and answer an
//! absurd value with an error that names the limit, never with a panic or a saturated number.

use std::time::Duration;

/// Largest duration accepted: ten years of 365 days. Longer than any migration, round or
/// cooldown can sensibly last, and far inside what `std::time::Duration` and the timestamp
/// arithmetic built on it can hold.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Largest scaled quantity accepted (bytes, millicores): 2^63, so the value also fits an `i64`.
pub const MAX_QUANTITY: u64 = 1 << 63;
/// Significant digits a quantity's number may have (more is not a measurement but noise).
pub const MAX_QUANTITY_DIGITS: usize = 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum QuantityError {
    #[error("invalid quantity {0:?}")]
    Invalid(String),
    #[error("invalid duration {0:?}")]
    InvalidDuration(String),
    #[error("quantity {0:?} has more than {MAX_QUANTITY_DIGITS} significant digits")]
    TooPrecise(String),
    #[error("quantity {0:?} exceeds the limit of 2^63 (9223372036854775808)")]
    TooLarge(String),
    #[error("duration {0:?} exceeds the limit of 10 years (87600h)")]
    DurationTooLong(String),
    #[error("duration {0:?} is shorter than the minimum of {1}")]
    DurationTooShort(String, &'static str),
}

/// Parses a quantity into its value times `10^scale_exponent` (3 for millicores, 0 for bytes),
/// rounded up as Kubernetes does for requests; at most [`MAX_QUANTITY`].
pub fn parse_scaled(text: &str, scale_exponent: u32) -> Result<u64, QuantityError> {
    let t = text.trim();
    let invalid = || QuantityError::Invalid(text.to_string());
    let t = t.strip_prefix('+').unwrap_or(t);
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, suffix) = t.split_at(split);
    // (decimal exponent, power of 1024) of the suffix.
    let (decimal, binary): (i64, u32) = match suffix {
        "" => (0, 0),
        "m" => (-3, 0),
        "k" => (3, 0),
        "M" => (6, 0),
        "G" => (9, 0),
        "T" => (12, 0),
        "P" => (15, 0),
        "E" => (18, 0),
        "Ki" => (0, 1),
        "Mi" => (0, 2),
        "Gi" => (0, 3),
        "Ti" => (0, 4),
        "Pi" => (0, 5),
        "Ei" => (0, 6),
        s if s.starts_with(['e', 'E']) => (parse_exponent(&s[1..]).ok_or_else(invalid)?, 0),
        _ => return Err(invalid()),
    };
    let (int_part, frac_part) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    if int_part.is_empty() && frac_part.is_empty() {
        return Err(invalid());
    }
    // The number as mantissa × 10^-fraction_digits, without leading or trailing zeros.
    let frac = frac_part.trim_end_matches('0');
    let digits = format!("{int_part}{frac}");
    let significant = digits.trim_start_matches('0');
    if significant.is_empty() {
        return Ok(0);
    }
    if significant.len() > MAX_QUANTITY_DIGITS {
        return Err(QuantityError::TooPrecise(text.to_string()));
    }
    let mantissa: u128 = significant.parse().map_err(|_| invalid())?;
    let too_large = || QuantityError::TooLarge(text.to_string());
    // mantissa < 10^20 < 2^67 and 1024^6 = 2^60: the product fits a u128.
    let value = mantissa * 1024u128.pow(binary);
    let exponent = decimal + i64::from(scale_exponent) - frac.len() as i64;
    let scaled = if exponent >= 0 {
        let factor = u32::try_from(exponent)
            .ok()
            .and_then(|e| 10u128.checked_pow(e))
            .ok_or_else(too_large)?;
        value.checked_mul(factor).ok_or_else(too_large)?
    } else {
        match u32::try_from(-exponent)
            .ok()
            .and_then(|e| 10u128.checked_pow(e))
        {
            Some(divisor) => value.div_ceil(divisor),
            // The divisor exceeds u128 and so the value: a positive fraction of one, rounded up.
            None => 1,
        }
    };
    if scaled > u128::from(MAX_QUANTITY) {
        return Err(too_large());
    }
    Ok(scaled as u64)
}

/// The exponent of `1e9`-style quantities; absurd magnitudes are clamped (they are out of
/// bounds either way, and the clamp keeps the sum with the other exponents from overflowing).
fn parse_exponent(text: &str) -> Option<i64> {
    let (negative, digits) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let magnitude = digits.parse::<i64>().unwrap_or(i64::MAX).min(1000);
    Some(if negative { -magnitude } else { magnitude })
}

pub fn cpu_millis(text: &str) -> Result<u64, QuantityError> {
    parse_scaled(text, 3)
}

pub fn bytes(text: &str) -> Result<u64, QuantityError> {
    parse_scaled(text, 0)
}

/// Parses a Go duration such as `90s`, `1m30s`, `1.5h`, `250ms`; at most [`MAX_DURATION`].
/// Fractions finer than a nanosecond are dropped, as Go drops them.
pub fn duration(text: &str) -> Result<Duration, QuantityError> {
    let invalid = || QuantityError::InvalidDuration(text.to_string());
    let too_long = || QuantityError::DurationTooLong(text.to_string());
    let max_nanos = MAX_DURATION.as_nanos();
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(invalid());
    }
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(invalid)?;
        let (int_part, frac_part) = match rest[..n].split_once('.') {
            Some((i, f)) => (i, f),
            None => (&rest[..n], ""),
        };
        if (int_part.is_empty() && frac_part.is_empty()) || frac_part.contains('.') {
            return Err(invalid());
        }
        rest = &rest[n..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit_nanos: u128 = match &rest[..unit_len] {
            "ns" => 1,
            "us" | "µs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(invalid()),
        };
        rest = &rest[unit_len..];
        let int_digits = int_part.trim_start_matches('0');
        // 10^25 ns is already longer than the limit; more digits cannot be in bounds.
        if int_digits.len() > 25 {
            return Err(too_long());
        }
        let whole: u128 = if int_digits.is_empty() {
            0
        } else {
            int_digits.parse().map_err(|_| invalid())?
        };
        // Twenty fraction digits are below a nanosecond for every unit.
        let frac_digits = &frac_part[..frac_part.len().min(20)];
        let fraction = if frac_digits.is_empty() {
            0
        } else {
            let f: u128 = frac_digits.parse().map_err(|_| invalid())?;
            f * unit_nanos / 10u128.pow(frac_digits.len() as u32)
        };
        total = whole
            .checked_mul(unit_nanos)
            .and_then(|w| w.checked_add(fraction))
            .and_then(|v| v.checked_add(total))
            .ok_or_else(too_long)?;
        if total > max_nanos {
            return Err(too_long());
        }
    }
    Ok(Duration::new(
        (total / 1_000_000_000) as u64,
        (total % 1_000_000_000) as u32,
    ))
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
        assert_eq!(duration("0s").unwrap(), Duration::ZERO);
        assert_eq!(duration("1.000000001s").unwrap().subsec_nanos(), 1);
        assert!(duration("").is_err());
        assert!(duration("5 minutes").is_err());
        assert!(duration("s").is_err());
        assert!(duration(".s").is_err());
        assert!(duration("-5s").is_err());
    }

    #[test]
    fn an_absurd_duration_is_an_error_naming_the_limit() {
        for text in ["99999999999999999999h", "87601h", "315360001s", "1h87600h"] {
            let e = duration(text).unwrap_err();
            assert_eq!(e, QuantityError::DurationTooLong(text.into()));
            assert!(e.to_string().contains("10 years (87600h)"), "{e}");
        }
        assert!(duration(&format!("{}h", "9".repeat(400))).is_err());
        assert_eq!(duration("87600h").unwrap(), MAX_DURATION);
        assert!(duration("87599h59m60.000000001s").is_err());
    }

    #[test]
    fn parses_the_usual_forms() {
        assert_eq!(cpu_millis("500m").unwrap(), 500);
        assert_eq!(cpu_millis("2").unwrap(), 2000);
        assert_eq!(cpu_millis("1.5").unwrap(), 1500);
        assert_eq!(cpu_millis("0.0001").unwrap(), 1, "rounded up");
        assert_eq!(bytes("1Gi").unwrap(), 1 << 30);
        assert_eq!(bytes("512Mi").unwrap(), 512 << 20);
        assert_eq!(bytes("1.5Ki").unwrap(), 1536);
        assert_eq!(bytes("1e9").unwrap(), 1_000_000_000);
        assert_eq!(bytes("1E3").unwrap(), 1000);
        assert_eq!(bytes("2G").unwrap(), 2_000_000_000);
        assert_eq!(bytes("+2k").unwrap(), 2000);
        assert_eq!(bytes("0").unwrap(), 0);
        assert_eq!(
            bytes("1e-400").unwrap(),
            1,
            "a positive fraction rounds up to one"
        );
        assert!(bytes("lots").is_err());
        assert!(bytes("1Xi").is_err());
        assert!(bytes("-1").is_err());
        assert!(bytes(".").is_err());
        assert!(bytes("1e").is_err());
    }

    #[test]
    fn an_absurd_quantity_is_an_error_naming_the_limit() {
        assert_eq!(bytes("8Ei").unwrap(), MAX_QUANTITY);
        for text in [
            "9Ei",
            "1e19",
            "1e999999999999999999999",
            "10000000000000000000T",
        ] {
            let e = bytes(text).unwrap_err();
            assert_eq!(e, QuantityError::TooLarge(text.into()));
            assert!(e.to_string().contains("2^63"), "{e}");
        }
        let long = "1".repeat(21);
        assert_eq!(bytes(&long), Err(QuantityError::TooPrecise(long.clone())));
        assert_eq!(bytes("0000000000000000000000000000001").unwrap(), 1);
    }
}

/// Strings the API server accepts, generated from the patterns in the CRD schemas themselves
/// (so a loosened pattern is tested as soon as it is loosened).
#[cfg(test)]
mod accepted_by_the_crds {
    use super::*;
    use kube::CustomResourceExt;
    use proptest::prelude::*;

    /// The `pattern` of `spec.<field>` in the CRD of `R`, without its anchors.
    fn spec_pattern<R: CustomResourceExt>(field: &str) -> String {
        let crd = serde_json::to_value(R::crd()).expect("CRD serializes");
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let pattern = schema["properties"]["spec"]["properties"][field]["pattern"]
            .as_str()
            .unwrap_or_else(|| panic!("{} spec.{field} has a pattern", R::crd_name()));
        pattern
            .trim_start_matches('^')
            .trim_end_matches('$')
            .to_string()
    }

    fn strings(pattern: &str) -> proptest::string::RegexGeneratorStrategy<String> {
        proptest::string::string_regex(pattern).expect("the CRD pattern is a regular expression")
    }

    /// The seconds a Go duration denotes, in floating point: the oracle for the exact parser.
    fn approximate_seconds(text: &str) -> f64 {
        let mut total = 0.0;
        let mut rest = text;
        while !rest.is_empty() {
            let n = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap();
            let value: f64 = rest[..n].parse().unwrap();
            rest = &rest[n..];
            let u = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            total += value
                * match &rest[..u] {
                    "ms" => 1e-3,
                    "s" => 1.0,
                    "m" => 60.0,
                    "h" => 3600.0,
                    other => panic!("unit {other} is outside the CRD pattern"),
                };
            rest = &rest[u..];
        }
        total
    }

    fn check_duration(text: &str) -> Result<(), TestCaseError> {
        let approx = approximate_seconds(text);
        let max = MAX_DURATION.as_secs_f64();
        match duration(text) {
            Ok(d) => {
                prop_assert!(d <= MAX_DURATION, "{text} gave {d:?}");
                prop_assert!(
                    (d.as_secs_f64() - approx).abs() <= 1e-6 * approx.max(1.0),
                    "{text}: {d:?} but about {approx}s"
                );
            }
            Err(e) => {
                prop_assert_eq!(e.clone(), QuantityError::DurationTooLong(text.into()));
                prop_assert!(approx >= max * (1.0 - 1e-9), "{text} refused: {e}");
            }
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn migration_durations_parse_or_fail_within_bounds(
            max in strings(&spec_pattern::<crate::api::VirtualMachineMigration>("maxDuration")),
            setup in strings(&spec_pattern::<crate::api::VirtualMachineMigration>("pathSetupBudget")),
        ) {
            check_duration(&max)?;
            check_duration(&setup)?;
        }

        #[test]
        fn rebalance_durations_parse_or_fail_within_bounds(
            interval in strings(&spec_pattern::<crate::api::RebalancePolicy>("interval")),
            cooldown in strings(&spec_pattern::<crate::api::RebalancePolicy>("cooldown")),
        ) {
            check_duration(&interval)?;
            check_duration(&cooldown)?;
        }

        #[test]
        fn network_setup_time_parses_or_fails_within_bounds(
            setup in strings(&spec_pattern::<crate::api::MigrationNetwork>("setupTime")),
        ) {
            check_duration(&setup)?;
        }

        #[test]
        fn network_bandwidth_parses_or_fails_within_bounds(
            bandwidth in strings(&spec_pattern::<crate::api::MigrationNetwork>("bandwidth")),
        ) {
            let split = bandwidth.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(bandwidth.len());
            let number: f64 = bandwidth[..split].parse().unwrap();
            let approx = number * match &bandwidth[split..] {
                "" => 1.0, "k" => 1e3, "M" => 1e6, "G" => 1e9, "T" => 1e12,
                "Ki" => 1024.0, "Mi" => 1024f64.powi(2), "Gi" => 1024f64.powi(3),
                "Ti" => 1024f64.powi(4),
                other => panic!("suffix {other} is outside the CRD pattern"),
            };
            match bytes(&bandwidth) {
                Ok(b) => {
                    prop_assert!(b <= MAX_QUANTITY);
                    prop_assert!((b as f64 - approx).abs() <= 1.0 + 1e-9 * approx, "{bandwidth}: {b}");
                }
                Err(QuantityError::TooLarge(_)) => prop_assert!(approx >= MAX_QUANTITY as f64 * (1.0 - 1e-9)),
                Err(QuantityError::TooPrecise(_)) => {
                    let significant = bandwidth[..split].replace('.', "");
                    let significant = significant.trim_start_matches('0');
                    prop_assert!(significant.len() > MAX_QUANTITY_DIGITS, "{bandwidth}");
                }
                Err(e) => prop_assert!(false, "{bandwidth} refused: {e}"),
            }
        }
    }
}
