//! Work groups and the distances between them (seed 002).
//!
//! A work group is the value of a node label (default `topology.kubernetes.io/zone`).
//! Distances come from configuration: a symmetric matrix. An empty matrix means "all work
//! groups are equally far"; a non-empty one must name every work group it is asked about.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const DEFAULT_WORK_GROUP_LABEL: &str = "topology.kubernetes.io/zone";
/// Work group of nodes without the label.
pub const UNLABELLED_WORK_GROUP: &str = "default";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DistanceError {
    #[error("work group {0:?} is not in the distance matrix")]
    UnknownWorkGroup(String),
    #[error("distance entry {0:?} is not of the form a:b=NUMBER")]
    BadEntry(String),
    #[error("distance between {0} and {1} must be a finite number >= 0")]
    BadDistance(String, String),
}

/// Symmetric distances between work groups: `{"zone-a": {"zone-b": 10}}`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DistanceMatrix {
    entries: BTreeMap<String, BTreeMap<String, f64>>,
}

impl DistanceMatrix {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn set(&mut self, a: &str, b: &str, d: f64) -> Result<(), DistanceError> {
        if !d.is_finite() || d < 0.0 {
            return Err(DistanceError::BadDistance(a.into(), b.into()));
        }
        self.entries
            .entry(a.to_string())
            .or_default()
            .insert(b.to_string(), d);
        self.entries.entry(b.to_string()).or_default();
        Ok(())
    }

    /// Parses `a:b=10,a:c=20` (the flag form).
    pub fn parse(text: &str) -> Result<Self, DistanceError> {
        let mut m = DistanceMatrix::default();
        for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let bad = || DistanceError::BadEntry(entry.to_string());
            let (pair, d) = entry.split_once('=').ok_or_else(bad)?;
            let (a, b) = pair.split_once(':').ok_or_else(bad)?;
            let d: f64 = d.trim().parse().map_err(|_| bad())?;
            m.set(a.trim(), b.trim(), d)?;
        }
        Ok(m)
    }

    fn knows(&self, g: &str) -> bool {
        self.entries.contains_key(g) || self.entries.values().any(|row| row.contains_key(g))
    }

    /// Distance between two work groups: 0 to itself; 1 between any two when the matrix is
    /// empty; otherwise the configured value (either direction). A group the matrix does not
    /// know, or a missing pair, is an error so a typo never silently wins a tie.
    pub fn distance(&self, a: &str, b: &str) -> Result<f64, DistanceError> {
        if a == b {
            return Ok(0.0);
        }
        if self.entries.is_empty() {
            return Ok(1.0);
        }
        for g in [a, b] {
            if !self.knows(g) {
                return Err(DistanceError::UnknownWorkGroup(g.to_string()));
            }
        }
        self.entries
            .get(a)
            .and_then(|row| row.get(b))
            .or_else(|| self.entries.get(b).and_then(|row| row.get(a)))
            .copied()
            .ok_or_else(|| DistanceError::UnknownWorkGroup(format!("{a}:{b}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_is_symmetric() {
        let m = DistanceMatrix::parse("a:b=10, a:c=20").unwrap();
        assert_eq!(m.distance("b", "a").unwrap(), 10.0);
        assert_eq!(m.distance("a", "c").unwrap(), 20.0);
        assert_eq!(m.distance("c", "c").unwrap(), 0.0);
    }

    #[test]
    fn unknown_group_is_an_error() {
        let m = DistanceMatrix::parse("a:b=10").unwrap();
        assert_eq!(
            m.distance("a", "zz"),
            Err(DistanceError::UnknownWorkGroup("zz".into()))
        );
        assert!(DistanceMatrix::parse("a-b=1").is_err());
        assert!(DistanceMatrix::parse("a:b=-1").is_err());
        assert!(DistanceMatrix::parse("a:b=x").is_err());
    }

    #[test]
    fn empty_matrix_means_equal_distances() {
        let m = DistanceMatrix::default();
        assert_eq!(m.distance("x", "y").unwrap(), 1.0);
    }
}
