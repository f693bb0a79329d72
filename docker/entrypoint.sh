#!/bin/sh
# egress-warden container entrypoint: maps EGRESS_WARDEN_* variables to `egress-warden run` flags
# and execs, so the proxy is PID 1 and gets SIGTERM directly.
#
#   docker run IMAGE                          run with the variables below (or their defaults)
#   docker run IMAGE --resolve host:1.2.3.4   extra `run` flags, placed last so they win
#   docker run IMAGE pending | approve ID ... any other subcommand: `egress-warden "$@"` as is
#
# Every `run` option has a variable (unset or empty: the flag is not given). Lists are separated
# by spaces (EGRESS_WARDEN_POLICY also by colons); each item becomes one flag.
#
# EGRESS_WARDEN_POLICY           --policy, files (default /etc/egress-warden/policies/default.yaml)
# EGRESS_WARDEN_REQUIREMENTS     --requirements, the admin-managed requirements file
# EGRESS_WARDEN_AGENTS           --agents, the agents file (default <state>/agents.yaml)
# EGRESS_WARDEN_LISTEN           --listen, the proxy listener          (default 0.0.0.0:8080)
# EGRESS_WARDEN_CONTROL          --control, the control API listener   (default 0.0.0.0:8081;
#                                bind it where agents cannot reach it, see docs/fleet.md)
# EGRESS_WARDEN_CONTROL_HOST     --control-host, list: Host names the control API answers to
#                                (e.g. 127.0.0.1 when the port is published on the host)
# EGRESS_WARDEN_SOCKS            --socks, a SOCKS5 listener
# EGRESS_WARDEN_TRANSPARENT      --transparent, the listener for kernel-redirected connections
#                                (sidecar; docker/sidecar-init.sh installs the redirect)
# EGRESS_WARDEN_DNS              --dns, the policy-aware DNS listener (sidecar)
# EGRESS_WARDEN_SOURCE_AGENT     --source-agent, list of CIDR=AGENT (transparent mode identity)
# EGRESS_WARDEN_STATE_DIR        --state-dir: CA, generated control token, agents file
#                                (default /var/lib/egress-warden)
# EGRESS_WARDEN_STORE            --store, e.g. postgresql://user:pass@host:5432/db (else SQLite
#                                in the state dir)
# EGRESS_WARDEN_MODE             --mode, enforce | audit (default: the policy's mode)
# EGRESS_WARDEN_RESOLVE          --resolve, list of HOST:IP
# EGRESS_WARDEN_NAMESERVER       --nameserver, list of IP[:PORT]
# EGRESS_WARDEN_DRAIN            --drain, e.g. 10s
# EGRESS_WARDEN_WORKERS          --workers, proxy processes sharing the port
# EGRESS_WARDEN_UPSTREAM_CA      --upstream-ca, CA bundle for upstreams of inspected hosts
# EGRESS_WARDEN_AUDIT_RETENTION  --audit-retention, e.g. 30d
# EGRESS_WARDEN_AUDIT_PER_AGENT  --audit-per-agent, rows kept per agent
# EGRESS_WARDEN_CONTROL_TOKEN    read by egress-warden itself (never a flag): the control API
#                                token, at least 32 characters; unset: generated into
#                                <state>/control-token
# EGRESS_WARDEN_BIN              the executable (default egress-warden; tests point it elsewhere)
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

set -f # list items are words, never globs
old_ifs=$IFS
IFS=" :$(printf '\t')
"
for policy in ${EGRESS_WARDEN_POLICY:-/etc/egress-warden/policies/default.yaml}; do
    set -- "$@" --policy "$policy"
done
# The other lists hold colons themselves (HOST:IP, IPv6, CIDR=AGENT): spaces only.
IFS=" $(printf '\t')
"
for name in ${EGRESS_WARDEN_CONTROL_HOST:-}; do
    set -- "$@" --control-host "$name"
done
for mapping in ${EGRESS_WARDEN_SOURCE_AGENT:-}; do
    set -- "$@" --source-agent "$mapping"
done
for mapping in ${EGRESS_WARDEN_RESOLVE:-}; do
    set -- "$@" --resolve "$mapping"
done
for server in ${EGRESS_WARDEN_NAMESERVER:-}; do
    set -- "$@" --nameserver "$server"
done
IFS=$old_ifs
set +f

if [ -n "${EGRESS_WARDEN_REQUIREMENTS:-}" ]; then
    set -- "$@" --requirements "$EGRESS_WARDEN_REQUIREMENTS"
fi
if [ -n "${EGRESS_WARDEN_AGENTS:-}" ]; then
    set -- "$@" --agents "$EGRESS_WARDEN_AGENTS"
fi
if [ -n "${EGRESS_WARDEN_MODE:-}" ]; then
    set -- "$@" --mode "$EGRESS_WARDEN_MODE"
fi
if [ -n "${EGRESS_WARDEN_SOCKS:-}" ]; then
    set -- "$@" --socks "$EGRESS_WARDEN_SOCKS"
fi
if [ -n "${EGRESS_WARDEN_TRANSPARENT:-}" ]; then
    set -- "$@" --transparent "$EGRESS_WARDEN_TRANSPARENT"
fi
if [ -n "${EGRESS_WARDEN_DNS:-}" ]; then
    set -- "$@" --dns "$EGRESS_WARDEN_DNS"
fi
if [ -n "${EGRESS_WARDEN_DRAIN:-}" ]; then
    set -- "$@" --drain "$EGRESS_WARDEN_DRAIN"
fi
if [ -n "${EGRESS_WARDEN_WORKERS:-}" ]; then
    set -- "$@" --workers "$EGRESS_WARDEN_WORKERS"
fi
if [ -n "${EGRESS_WARDEN_UPSTREAM_CA:-}" ]; then
    set -- "$@" --upstream-ca "$EGRESS_WARDEN_UPSTREAM_CA"
fi
if [ -n "${EGRESS_WARDEN_AUDIT_RETENTION:-}" ]; then
    set -- "$@" --audit-retention "$EGRESS_WARDEN_AUDIT_RETENTION"
fi
if [ -n "${EGRESS_WARDEN_AUDIT_PER_AGENT:-}" ]; then
    set -- "$@" --audit-per-agent "$EGRESS_WARDEN_AUDIT_PER_AGENT"
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
