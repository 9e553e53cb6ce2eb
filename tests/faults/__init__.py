"""Hostile input, faults and signatures (issue 7): every isep command run through real pipes on
damaged, truncated, hostile or forged input and under faults (disk full, signals, closed pipes,
concurrent runs), with the invariants of tests.harness.run checked on every run."""
