#!/usr/bin/env bash
# The voxgate firewall lab: a gateway host and up to three clients, each behind its own router
# namespace with real nftables rules and (optionally) NAT. Used by `cargo test --test lab`, and
# by hand (see tests/lab/README.md). Everything lives in network namespaces named ${LAB}*; only
# addresses inside them are used.
#
#   lab.sh up                      build the hosts (idempotent: tears down first)
#   lab.sh down                    remove every namespace of this lab
#   lab.sh fw N CLASS              client N's firewall: open | no-udp-out | no-udp-in | no-udp
#                                  | portal (UDP only to/from the gateway's address)
#                                  | port-restricted (UDP out only to the gateway's ports)
#                                  | proxy-only (nothing forwarded at all: the only way out is
#                                    the router's own Squid, `lab.sh squid N`)
#   lab.sh nat N MODE              client N's NAT: none | masquerade | symmetric
#   lab.sh natloss N               client N's NAT loses its UDP mappings and re-creates them
#                                  with new (random) ports; TCP connections survive
#   lab.sh family N v4|v6          client N keeps only its IPv4 or only its IPv6 address
#   lab.sh counters N              client N's router counters
#   lab.sh reset N                 zero client N's router counters
#   lab.sh exec HOST CMD...        run CMD on host gw | c1 | c2 | c3 | r1 | r2 | r3 (| gwr)
#   lab.sh squid N                 start a real Squid on router N (10.N.0.1:3128) that allows
#                                  CONNECT to port 443 only (and nothing else) for client N
#
# Addresses: "Internet" 172.31.0.0/24 on a bridge; gateway 172.31.0.1; router N's WAN
# 172.31.0.1N; client N 10.N.0.2 on router N's LAN 10.N.0.1/24. IPv6 (routed, no NAT):
# "Internet" 2001:db8:31::/64, gateway 2001:db8:31::1, router N 2001:db8:31::1N, client N
# 2001:db8:N::2 on 2001:db8:N::/64.
#
# GW_NAT=1 lab.sh up: the gateway sits behind its own router (host gwr) doing 1:1 NAT, as a
# cloud instance does: gwr holds the public addresses 172.31.0.1 and 2001:db8:31::1 on the
# "Internet", DNATs everything for them to the gateway's private 192.168.77.2 / fd77::2 (gwr's
# LAN 192.168.77.1/24, fd77::1/64), and SNATs what the gateway sends back out. Clients reach
# the gateway only at the public addresses; the gateway itself sees its private ones.
set -euo pipefail
LAB=${LAB:-vgl}
GW_IP=172.31.0.1
GW_IP6=2001:db8:31::1
GW_PRIVATE=192.168.77.2
GW_PRIVATE6=fd77::2
GW_NAT=${GW_NAT:-0}
MEDIA_PORTS=${MEDIA_PORTS:-7401-7408}
PROBE_PORTS=${PROBE_PORTS:-7390-7391}
CLIENTS=${CLIENTS:-3}

ns() { echo "${LAB}$1"; }
x() { ip netns exec "$(ns "$1")" "${@:2}"; }

# The gateway behind a 1:1 NAT router (GW_NAT=1).
gw_behind_nat() {
    ip netns add "$(ns gwr)"
    ip link add wan netns "$(ns gwr)" type veth peer name p-gwr netns "$(ns inet)"
    ip link add lan netns "$(ns gwr)" type veth peer name gw0 netns "$(ns gw)"
    x inet ip link set p-gwr master br0 up
    x gwr ip link set lo up
    x gwr ip addr add "$GW_IP/24" dev wan
    x gwr ip -6 addr add "$GW_IP6/64" dev wan nodad
    x gwr ip addr add "192.168.77.1/24" dev lan
    x gwr ip -6 addr add "fd77::1/64" dev lan nodad
    x gwr ip link set wan up
    x gwr ip link set lan up
    x gwr sysctl -qw net.ipv4.ip_forward=1
    x gwr sysctl -qw net.ipv6.conf.all.forwarding=1
    x gw ip link set lo up
    x gw ip addr add "$GW_PRIVATE/24" dev gw0
    x gw ip -6 addr add "$GW_PRIVATE6/64" dev gw0 nodad
    x gw ip link set gw0 up
    x gw ip route add default via 192.168.77.1
    x gw ip -6 route add default via fd77::1
    x gwr nft -f - <<NFT
flush ruleset
table inet gwnat {
    chain prerouting {
        type nat hook prerouting priority dstnat; policy accept;
        iifname "wan" ip daddr $GW_IP dnat ip to $GW_PRIVATE
        iifname "wan" ip6 daddr $GW_IP6 dnat ip6 to $GW_PRIVATE6
    }
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" ip saddr $GW_PRIVATE snat ip to $GW_IP
        oifname "wan" ip6 saddr $GW_PRIVATE6 snat ip6 to $GW_IP6
    }
}
NFT
}

down() {
    for n in $(ip netns list | awk '{print $1}' | grep "^${LAB}" || true); do
        ip netns pids "$n" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        ip netns del "$n" 2>/dev/null || true
    done
    rm -rf "/run/${LAB}-squid-"* 2>/dev/null || true
}

up() {
    down
    # Where the routes to the client LANs live: the gateway, or its NAT router.
    if [ "$GW_NAT" = 1 ]; then GW_EDGE=gwr; else GW_EDGE=gw; fi
    ip netns add "$(ns inet)"
    x inet ip link add br0 type bridge
    x inet ip link set br0 up
    x inet ip link set lo up
    # The gateway host.
    ip netns add "$(ns gw)"
    if [ "$GW_NAT" = 1 ]; then
        gw_behind_nat
    else
        ip link add gw0 netns "$(ns gw)" type veth peer name p-gw netns "$(ns inet)"
        x inet ip link set p-gw master br0 up
        x gw ip link set lo up
        x gw ip addr add "$GW_IP/24" dev gw0
        x gw ip -6 addr add "$GW_IP6/64" dev gw0 nodad
        x gw ip link set gw0 up
    fi
    for n in $(seq 1 "$CLIENTS"); do
        ip netns add "$(ns "r$n")"
        ip netns add "$(ns "c$n")"
        ip link add wan netns "$(ns "r$n")" type veth peer name "p-r$n" netns "$(ns inet)"
        x inet ip link set "p-r$n" master br0 up
        ip link add lan netns "$(ns "r$n")" type veth peer name eth0 netns "$(ns "c$n")"
        x "r$n" ip link set lo up
        x "r$n" ip addr add "172.31.0.1$n/24" dev wan
        x "r$n" ip addr add "10.$n.0.1/24" dev lan
        x "r$n" ip link set wan up
        x "r$n" ip link set lan up
        x "r$n" sysctl -qw net.ipv4.ip_forward=1
        x "r$n" sysctl -qw net.ipv6.conf.all.forwarding=1
        x "r$n" ip -6 addr add "2001:db8:31::1$n/64" dev wan nodad
        x "r$n" ip -6 addr add "2001:db8:$n::1/64" dev lan nodad
        x "c$n" ip link set lo up
        x "c$n" ip addr add "10.$n.0.2/24" dev eth0
        x "c$n" ip link set eth0 up
        x "c$n" ip route add default via "10.$n.0.1"
        x "c$n" ip -6 addr add "2001:db8:$n::2/64" dev eth0 nodad
        x "c$n" ip -6 route add default via "2001:db8:$n::1"
        x "$GW_EDGE" ip -6 route add "2001:db8:$n::/64" via "2001:db8:31::1$n"
        # Client LANs are routed on the "Internet" (until NAT hides them).
        x "$GW_EDGE" ip route add "10.$n.0.0/24" via "172.31.0.1$n"
        rules "$n" open none
    done
    for n in $(seq 1 "$CLIENTS"); do
        for m in $(seq 1 "$CLIENTS"); do
            [ "$m" = "$n" ] && continue
            x "r$n" ip route add "10.$m.0.0/24" via "172.31.0.1$m"
            x "r$n" ip -6 route add "2001:db8:$m::/64" via "2001:db8:31::1$m"
        done
    done
}

# rules N CLASS NAT: (re)writes router N's whole ruleset.
rules() {
    local n=$1 class=$2 nat=$3 drops="" natrule="" inbound_new=""
    case "$class" in
        open) ;;
        no-udp-out) drops='iifname "lan" meta l4proto udp drop' ;;
        no-udp-in) drops='iifname "wan" meta l4proto udp drop' ;;
        no-udp) drops=$'iifname "lan" meta l4proto udp drop\n        iifname "wan" meta l4proto udp drop' ;;
        # The seed's "secure portal": UDP passes only to and from the gateway's address.
        portal) drops="iifname \"lan\" meta l4proto udp ip daddr != $GW_IP drop
        iifname \"wan\" meta l4proto udp ip saddr != $GW_IP drop" ;;
        # A corporate rule: outbound UDP only to a port range (the gateway's probe and media
        # ports), replies allowed back; other inbound UDP is not restricted.
        port-restricted) drops="iifname \"lan\" udp dport != { $PROBE_PORTS, $MEDIA_PORTS } drop" ;;
        # A corporate network whose only way out is the proxy on the router: nothing is
        # forwarded either way (what the client tries is counted, ICMP aside).
        proxy-only) drops='iifname "lan" meta l4proto != { icmp, ipv6-icmp } counter name lan_forwarded
        iifname "lan" drop
        oifname "lan" drop' ;;
        *) echo "unknown firewall class $class" >&2; exit 2 ;;
    esac
    case "$nat" in
        none) ;;
        masquerade) natrule='oifname "wan" masquerade' ;;
        symmetric) natrule='oifname "wan" masquerade random' ;;
        *) echo "unknown NAT mode $nat" >&2; exit 2 ;;
    esac
    # A NAT router admits from outside only what belongs to a connection from inside.
    [ "$nat" = none ] || inbound_new='iifname "wan" oifname "lan" ct state new drop'
    echo "$class $nat" > "/run/${LAB}-r$n.state"
    x "r$n" nft -f - <<NFT
flush ruleset
table inet lab {
    counter udp_out_gw {}
    counter udp_out_peer {}
    counter tcp_out_gw {}
    counter udp_in_gw {}
    counter udp_in_peer {}
    counter tcp_in_gw {}
    counter lan_forwarded {}
    counter tcp_to_proxy {}
    counter lan_to_router_other {}
    chain input {
        type filter hook input priority filter; policy accept;
        iifname "lan" tcp dport 3128 counter name tcp_to_proxy
        iifname "lan" meta l4proto { tcp, udp } th dport != 3128 counter name lan_to_router_other
    }
    chain forward {
        type filter hook forward priority filter; policy accept;
        $drops
        $inbound_new
        iifname "lan" ip daddr $GW_IP udp dport { $MEDIA_PORTS } meta length > 150 counter name udp_out_gw
        iifname "lan" ip daddr != $GW_IP meta l4proto udp meta length > 150 counter name udp_out_peer
        iifname "lan" ip daddr $GW_IP tcp dport { $MEDIA_PORTS } meta length > 150 counter name tcp_out_gw
        iifname "wan" ip saddr $GW_IP udp sport { $MEDIA_PORTS } meta length > 150 counter name udp_in_gw
        iifname "wan" ip saddr != $GW_IP meta l4proto udp meta length > 150 counter name udp_in_peer
        iifname "wan" ip saddr $GW_IP tcp sport { $MEDIA_PORTS } meta length > 150 counter name tcp_in_gw
        iifname "lan" ip6 daddr $GW_IP6 udp dport { $MEDIA_PORTS } meta length > 150 counter name udp_out_gw
        iifname "lan" ip6 daddr != $GW_IP6 meta l4proto udp meta length > 150 counter name udp_out_peer
        iifname "wan" ip6 saddr $GW_IP6 udp sport { $MEDIA_PORTS } meta length > 150 counter name udp_in_gw
        iifname "wan" ip6 saddr != $GW_IP6 meta l4proto udp meta length > 150 counter name udp_in_peer
    }
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        $natrule
    }
}
NFT
    # Forget connections made under the old rules (only the UDP ones with UDP_ONLY=1: a NAT
    # that loses its UDP mappings while TCP connections stay up).
    if [ "${UDP_ONLY:-0}" = 1 ]; then
        x "r$n" conntrack -D -p udp >/dev/null 2>&1 || true
    else
        x "r$n" conntrack -F >/dev/null 2>&1 || true
    fi
}

# squid N: a real Squid on router N for client N's LAN, CONNECT to port 443 only.
squid_up() {
    local n=$1 dir="/run/${LAB}-squid-$1"
    mkdir -p "$dir"
    chmod 0777 "$dir"
    cat > "$dir/squid.conf" <<CONF
http_port 10.$n.0.1:3128
acl lan src 10.$n.0.0/24
acl SSL_ports port 443
acl CONNECT method CONNECT
http_access deny !CONNECT
http_access deny CONNECT !SSL_ports
http_access allow lan
http_access deny all
cache deny all
cache_mem 8 MB
pid_filename $dir/squid.pid
cache_log $dir/cache.log
access_log stdio:$dir/access.log
coredump_dir $dir
shutdown_lifetime 0 seconds
dns_nameservers 127.0.0.1
CONF
    x "r$n" squid -N -f "$dir/squid.conf" > "$dir/out.log" 2>&1 &
    # Ready once it says it accepts (a connection alone can race its start-up) and answers.
    for _ in $(seq 100); do
        if grep -q "Accepting HTTP Socket connections" "$dir/cache.log" 2>/dev/null \
                && x "r$n" bash -c "exec 3<>/dev/tcp/10.$n.0.1/3128" 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "squid on r$n did not start:" >&2
    cat "$dir/out.log" "$dir/cache.log" >&2 2>/dev/null || true
    exit 1
}

state() { cat "/run/${LAB}-r$1.state" 2>/dev/null || echo "open none"; }

case "${1:-}" in
    up) up ;;
    down) down ;;
    fw) read -r _ nat < <(state "$2"); rules "$2" "$3" "$nat" ;;
    nat) read -r class _ < <(state "$2"); rules "$2" "$class" "$3" ;;
    natloss) read -r class _ < <(state "$2"); UDP_ONLY=1 rules "$2" "$class" symmetric ;;
    family)
        case "$3" in
            v6) x "c$2" ip -4 addr flush dev eth0 ;;
            v4) x "c$2" ip -6 addr flush dev eth0 scope global ;;
            *) echo "family: v4 or v6" >&2; exit 2 ;;
        esac ;;
    counters) x "r$2" nft list counters table inet lab ;;
    reset) x "r$2" nft reset counters table inet lab >/dev/null ;;
    exec) shift; h=$1; shift; x "$h" "$@" ;;
    squid) squid_up "$2" ;;
    *) sed -n '2,20p' "$0"; exit 2 ;;
esac
