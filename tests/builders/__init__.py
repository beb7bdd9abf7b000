"""Builders shared by test modules: functions that write test inputs (JPEGs, bundles, served
frames, a prepared folder and train params). A test module imports them from here, never from
another test module; fixtures stay in the conftest.py files (tests/conftest.py, tests/unit/...)."""
