#!/bin/sh
# egress-warden sidecar init container: installs the nftables rules that make the proxy the
# agent's only way out of the pod's (shared) network namespace. Run it once, as root with
# CAP_NET_ADMIN, before the agent starts; the proxy container runs with
# `run --transparent 127.0.0.1:$EGRESS_WARDEN_TRANSPARENT_PORT --dns 127.0.0.1:$EGRESS_WARDEN_DNS_PORT`
# (EGRESS_WARDEN_TRANSPARENT and EGRESS_WARDEN_DNS for the image's entrypoint) as user
# $EGRESS_WARDEN_UID. The image ships this script as /usr/local/bin/egress-warden-sidecar-init
# and nftables; docker/k8s/sidecar/ and docker/compose.yaml (profile `transparent`) wire it in.
#
#   sidecar-init.sh           install the rules (nft -f)
#   sidecar-init.sh --print   print them only
#
# The rules, and why:
#  - the proxy's own connections (socket owner $EGRESS_WARDEN_UID) leave untouched: it dials the
#    addresses it checked, and redirecting them back to itself would loop;
#  - TCP to the proxy's listening port on loopback stays as it is, so an agent that does use
#    HTTPS_PROXY keeps working (the control port is NOT exempt: an agent must not approve itself);
#  - DNS (UDP and TCP 53, to any address) goes to the policy-aware DNS listener: the agent cannot
#    reach any other resolver, so no query leaks a name and `ask` names get synthetic addresses;
#  - every other TCP connection goes to the transparent listener, which names it by TLS SNI or
#    Host header and dials the proxy's own resolution of that name (never the agent's address);
#  - the redirect runs before any other NAT in the namespace (priority -110, ahead of the usual
#    -100): Docker's embedded DNS installs its own DNAT of 127.0.0.11:53 there, and whichever
#    NAT chain maps a connection first wins, so the agent's queries must meet this one first;
#  - everything else the agent sends (other UDP, ICMP, IPv6, which is not redirected) is dropped:
#    the filter's policy is drop, and only redirected connections (`ct status dnat`: the filter
#    still sees the original output interface, not loopback), loopback and the proxy's own
#    traffic are accepted.
set -eu

PROXY_UID="${EGRESS_WARDEN_UID:-10001}"
PROXY_PORT="${EGRESS_WARDEN_PROXY_PORT:-8080}"
TRANSPARENT_PORT="${EGRESS_WARDEN_TRANSPARENT_PORT:-15001}"
DNS_PORT="${EGRESS_WARDEN_DNS_PORT:-15053}"

for value in "$PROXY_UID" "$PROXY_PORT" "$TRANSPARENT_PORT" "$DNS_PORT"; do
    case "$value" in
        "" | *[!0-9]*) echo "sidecar-init: not a number: '$value'" >&2; exit 2 ;;
    esac
done

rules() {
    cat <<EOF
table ip egress_warden_nat
delete table ip egress_warden_nat
table ip egress_warden_nat {
    chain output {
        type nat hook output priority -110; policy accept;
        meta skuid $PROXY_UID return
        ip daddr 127.0.0.0/8 tcp dport $PROXY_PORT return
        udp dport 53 redirect to :$DNS_PORT
        tcp dport 53 redirect to :$DNS_PORT
        meta l4proto tcp redirect to :$TRANSPARENT_PORT
    }
}
table inet egress_warden_filter
delete table inet egress_warden_filter
table inet egress_warden_filter {
    chain output {
        type filter hook output priority 0; policy drop;
        meta skuid $PROXY_UID accept
        ct status dnat accept
        oifname "lo" accept
    }
}
EOF
}

if [ "${1:-}" = "--print" ]; then
    rules
else
    rules | nft -f -
fi
