#!/bin/sh
# egress-warden container entrypoint: maps EGRESS_WARDEN_* variables to `egress-warden run` flags
# and execs, so the proxy is PID 1 and gets SIGTERM directly.
#
#   docker run IMAGE                          run with the variables below (or their defaults)
#   docker run IMAGE --resolve host:1.2.3.4   extra `run` flags, placed last so they win
#   docker run IMAGE pending | approve ID ... any other subcommand: `egress-warden "$@"` as is
#
# EGRESS_WARDEN_POLICY        policy files, space- or colon-separated
#                             (default /etc/egress-warden/policies/default.yaml)
# EGRESS_WARDEN_REQUIREMENTS  requirements file (optional)
# EGRESS_WARDEN_LISTEN        proxy listener   (default 0.0.0.0:8080)
# EGRESS_WARDEN_CONTROL       control listener (default 0.0.0.0:8081)
# EGRESS_WARDEN_STORE         store URL, e.g. postgresql://user:pass@host:5432/db; wins over:
# EGRESS_WARDEN_STATE_DIR     state directory  (default /var/lib/egress-warden)
# EGRESS_WARDEN_MODE          enforce | audit  (default: the policy's mode)
# EGRESS_WARDEN_BIN           the executable   (default egress-warden; tests point it elsewhere)
set -eu

bin="${EGRESS_WARDEN_BIN:-egress-warden}"

case "${1:-}" in
    run) shift ;;
    "" | -*) ;;
    *) exec "$bin" "$@" ;;
esac

# Append the flags derived from the environment, then rotate the caller's arguments behind them
# (argparse keeps the last value, so `docker run IMAGE --listen ...` overrides the variable).
n=$#
set -- "$@" --listen "${EGRESS_WARDEN_LISTEN:-0.0.0.0:8080}" \
    --control "${EGRESS_WARDEN_CONTROL:-0.0.0.0:8081}"

old_ifs=$IFS
IFS=" :$(printf '\t')
"
set -f
for policy in ${EGRESS_WARDEN_POLICY:-/etc/egress-warden/policies/default.yaml}; do
    set -- "$@" --policy "$policy"
done
set +f
IFS=$old_ifs

if [ -n "${EGRESS_WARDEN_REQUIREMENTS:-}" ]; then
    set -- "$@" --requirements "$EGRESS_WARDEN_REQUIREMENTS"
fi
if [ -n "${EGRESS_WARDEN_MODE:-}" ]; then
    set -- "$@" --mode "$EGRESS_WARDEN_MODE"
fi

# The state dir always holds the CA, a generated control token and the agents file; the
# database lives there too unless a store URL (e.g. PostgreSQL for a fleet) is given.
state="${EGRESS_WARDEN_STATE_DIR:-/var/lib/egress-warden}"
set -- "$@" --state-dir "$state"
if [ -n "${EGRESS_WARDEN_STORE:-}" ]; then
    set -- "$@" --store "$EGRESS_WARDEN_STORE"
fi

while [ "$n" -gt 0 ]; do
    set -- "$@" "$1"
    shift
    n=$((n - 1))
done

if [ -n "${EGRESS_WARDEN_CONTROL_TOKEN:-}" ]; then
    echo "egress-warden: control API token taken from EGRESS_WARDEN_CONTROL_TOKEN" >&2
else
    echo "egress-warden: control API token: $state/control-token (generated on first start)" >&2
fi

exec "$bin" run "$@"
