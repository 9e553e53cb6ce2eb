"""isep's tests, a package so that `from tests.harness import ...` names the one harness."""
