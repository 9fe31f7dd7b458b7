#!/usr/bin/env bash
# Configures (up) or unconfigures (down) a Linux real server for LVS-DR style
# direct routing: each VIP on lo (/32 or /128) so the server accepts packets sent
# to it, and ARP settings so it never answers ARP for, or sources ARP from, a VIP
# (only the balancer may draw the VIP's traffic).
#
#   lb-realserver.sh up   VIP [VIP...]
#   lb-realserver.sh down VIP [VIP...]
#
# IPv6 has no arp_ignore: a VIP on lo is not announced, and nothing routes the
# VIP to this host except the balancer's forwarded frames.
set -euo pipefail

usage() { echo "usage: $0 up|down VIP [VIP...]" >&2; exit 2; }
[ $# -ge 2 ] || usage
action=$1; shift

prefix() { case "$1" in *:*) echo 128 ;; *) echo 32 ;; esac; }

case "$action" in
up)
    sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2
    sysctl -qw net.ipv4.conf.lo.arp_ignore=1 net.ipv4.conf.lo.arp_announce=2
    for vip in "$@"; do
        ip addr replace "$vip/$(prefix "$vip")" dev lo
    done
    ;;
down)
    for vip in "$@"; do
        ip addr del "$vip/$(prefix "$vip")" dev lo 2>/dev/null || true
    done
    sysctl -qw net.ipv4.conf.all.arp_ignore=0 net.ipv4.conf.all.arp_announce=0
    sysctl -qw net.ipv4.conf.lo.arp_ignore=0 net.ipv4.conf.lo.arp_announce=0
    ;;
*) usage ;;
esac
