//! Tests of the planner's numbered rules (filled in alongside `simulate`).
