#!/usr/bin/env bash
# Configures (up) or unconfigures (down) a Linux real server for LVS-DR style
# direct routing: each VIP on lo (/32 or /128) so the server accepts packets sent
# to it, and ARP settings so it never answers ARP for, or sources ARP from, a VIP
# (only the balancer may draw the VIP's traffic).
#
#   lb-realserver.sh up          VIP [VIP...]
#   lb-realserver.sh down        VIP [VIP...]
#   lb-realserver.sh up-tunnel   IFACE VIP [VIP...]
#   lb-realserver.sh down-tunnel IFACE VIP [VIP...]
#
# IPv6 has no arp_ignore: a VIP on lo is not announced, and nothing routes the
# VIP to this host except the balancer's forwarded frames.
#
# up-tunnel is for services with `forwarding: ipip` or `gue`: the balancer sends
# the client's packet inside an outer IP (+UDP) header to this host's address on
# IFACE. It does what `up` does, relaxes reverse-path filtering (rp_filter 2,
# loose, on IFACE and `all`: the inner source is the client, which this host may
# not route back through IFACE), and starts the decapsulation, chosen by LB_DECAP:
#   xdp (default)  `lb-agent decap --iface IFACE $LB_DECAP_ARGS` in the background
#                  (the XDP program lb_decap: IPIP, IP6IP6, both cross forms, GUE on
#                  --gue-port, default 6080). LB_AGENT names the binary (default:
#                  lb-agent on PATH); its pid goes to $LB_DECAP_RUN/lb-decap-IFACE.pid
#                  and its log next to it (LB_DECAP_RUN defaults to /run).
#   kernel         the kernel's tunl0/ip6tnl0 and a GUE fou port (modules ipip,
#                  ip6_tunnel, fou; GUE_PORT, default 6080). Not exercised by the
#                  project's tests: their kernel has no tunnel modules.
#   none           addresses and sysctls only (run `lb-agent decap` yourself, e.g.
#                  as a systemd service).
# down-tunnel stops what up-tunnel started and then does what `down` does.
set -euo pipefail

usage() {
    echo "usage: $0 up|down VIP [VIP...]" >&2
    echo "       $0 up-tunnel|down-tunnel IFACE VIP [VIP...]" >&2
    exit 2
}
[ $# -ge 2 ] || usage
action=$1; shift

prefix() { case "$1" in *:*) echo 128 ;; *) echo 32 ;; esac; }

vips_up() {
    sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2
    sysctl -qw net.ipv4.conf.lo.arp_ignore=1 net.ipv4.conf.lo.arp_announce=2
    for vip in "$@"; do
        ip addr replace "$vip/$(prefix "$vip")" dev lo
    done
}

vips_down() {
    for vip in "$@"; do
        ip addr del "$vip/$(prefix "$vip")" dev lo 2>/dev/null || true
    done
    sysctl -qw net.ipv4.conf.all.arp_ignore=0 net.ipv4.conf.all.arp_announce=0
    sysctl -qw net.ipv4.conf.lo.arp_ignore=0 net.ipv4.conf.lo.arp_announce=0
}

decap_mode="${LB_DECAP:-xdp}"
run_dir="${LB_DECAP_RUN:-/run}"

decap_start() {
    local iface=$1
    case "$decap_mode" in
    xdp)
        local pidfile="$run_dir/lb-decap-$iface.pid" log="$run_dir/lb-decap-$iface.log"
        if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            echo "lb-agent decap already runs on $iface (pid $(cat "$pidfile"))" >&2
            return 0
        fi
        # shellcheck disable=SC2086 # LB_DECAP_ARGS is a list of arguments
        nohup "${LB_AGENT:-lb-agent}" decap --iface "$iface" ${LB_DECAP_ARGS:-} >"$log" 2>&1 &
        echo $! >"$pidfile"
        for _ in $(seq 100); do
            grep -q "decapsulator attached" "$log" && return 0
            if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
                rm -f "$pidfile"
                echo "lb-agent decap on $iface failed:" >&2; cat "$log" >&2; return 1
            fi
            sleep 0.1
        done
        echo "lb-agent decap on $iface did not attach within 10 s (log: $log)" >&2; return 1
        ;;
    kernel)
        modprobe ipip; modprobe ip6_tunnel; modprobe fou
        ip link set tunl0 up
        ip link set ip6tnl0 up
        sysctl -qw net.ipv4.conf.tunl0.rp_filter=2
        ip fou add port "${GUE_PORT:-6080}" gue
        ip -6 fou add port "${GUE_PORT:-6080}" gue
        ;;
    none) ;;
    *) echo "LB_DECAP=$decap_mode: expected xdp, kernel or none" >&2; exit 2 ;;
    esac
}

decap_stop() {
    local iface=$1
    case "$decap_mode" in
    xdp)
        local pidfile="$run_dir/lb-decap-$iface.pid"
        [ -f "$pidfile" ] || return 0
        local pid; pid=$(cat "$pidfile")
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        rm -f "$pidfile"
        ;;
    kernel)
        ip fou del port "${GUE_PORT:-6080}" 2>/dev/null || true
        ip -6 fou del port "${GUE_PORT:-6080}" 2>/dev/null || true
        ip link set tunl0 down 2>/dev/null || true
        ip link set ip6tnl0 down 2>/dev/null || true
        ;;
    none|*) ;;
    esac
}

case "$action" in
up) vips_up "$@" ;;
down) vips_down "$@" ;;
up-tunnel)
    [ $# -ge 2 ] || usage
    iface=$1; shift
    vips_up "$@"
    sysctl -qw net.ipv4.conf.all.rp_filter=2 "net.ipv4.conf.$iface.rp_filter=2"
    decap_start "$iface"
    ;;
down-tunnel)
    [ $# -ge 2 ] || usage
    iface=$1; shift
    decap_stop "$iface"
    vips_down "$@"
    ;;
*) usage ;;
esac
