"""The data checks (Great Expectations suites) the validate stage runs."""
