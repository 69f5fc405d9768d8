#!/bin/sh
# Refuse to start with a missing, placeholder or short secret.
#   tp-check-secrets VAR [VAR ...] [-- COMMAND ARGS...]
# Each VAR names an environment variable holding a secret (for `user:password` values, the part after the
# first colon is checked). The values are never printed. With `-- COMMAND`, runs COMMAND when all pass.
# Exit 3 names every variable that failed.
set -eu

MIN_LENGTH=${TP_SECRET_MIN_LENGTH:-12}
failed=""

check() {
  name=$1
  case "$name" in
    ""|[0-9]*|*[!A-Za-z0-9_]*) echo "tp-check-secrets: not a variable name: $name" >&2; exit 2 ;;
  esac
  eval "value=\${$name-}"
  case "$name" in
    *AUTH_STRING*) value=${value#*:} ;;   # user:password -> password
  esac
  lowered=$(printf '%s' "$value" | tr '[:upper:]' '[:lower:]')
  reason=""
  case "$lowered" in
    "") reason="unset or empty" ;;
    change-me|changeme|change_me|*change-me*|*changeme*|password|passw0rd|secret|admin|example|placeholder|\
    minioadmin|postgres|default|test|xxx*|todo*|"<"*">"|replace-me|*replace-me*|*your-*|*-here)
      reason="a placeholder" ;;
  esac
  if [ -z "$reason" ] && [ "${#value}" -lt "$MIN_LENGTH" ]; then
    reason="shorter than $MIN_LENGTH characters"
  fi
  if [ -n "$reason" ]; then
    echo "tp-check-secrets: $name is $reason: set a generated secret (python -c 'import secrets; print(secrets.token_urlsafe(24))')" >&2
    failed="$failed $name"
  fi
}

while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  check "$1"
  shift
done
if [ -n "$failed" ]; then
  echo "tp-check-secrets: refusing to start (fix:$failed)" >&2
  exit 3
fi
if [ $# -gt 0 ]; then
  shift  # the --
  [ $# -gt 0 ] && exec "$@"
fi
exit 0
