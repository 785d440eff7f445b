# Sourced by device_run.sh and ab_run.sh.
# pytest_log_ok LOG: the pytest run that wrote LOG printed its summary and no test failed
# or errored (a run killed by its timeout prints no summary).
pytest_log_ok() {
  grep -q -E "passed|failed" "$1" && ! grep -q -E "[0-9]+ (failed|error)" "$1"
}
