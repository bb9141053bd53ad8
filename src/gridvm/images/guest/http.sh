#!/bin/sh
# One HTTP/1.0 request on stdin/stdout (run by "nc -ll -e" for each connection).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
cr=$(printf '\r')
tmp=/tmp/http.$$
trap 'rm -f "$tmp" "$tmp.err"' EXIT

IFS=' ' read -t 10 -r method target proto || exit 0
while IFS= read -t 5 -r line; do
    line=${line%"$cr"}
    [ -z "$line" ] && break
done

# reply CODE BODY: the whole response, HTTP/1.0 with Content-Length.
reply() {
    printf '%s' "$2" >"$tmp"
    reply_file "$1" "$tmp"
}

# reply_file CODE FILE
reply_file() {
    case "$1" in
        200) reason=OK ;; 400) reason="Bad Request" ;; 404) reason="Not Found" ;;
        500) reason="Internal Server Error" ;; 503) reason="Service Unavailable" ;;
        *) reason=Unknown ;;
    esac
    printf 'HTTP/1.0 %s %s\r\nContent-Type: text/plain\r\nContent-Length: %s\r\nConnection: close\r\n\r\n' \
        "$1" "$reason" "$(wc -c <"$2" | tr -d ' ')"
    [ "$method" = HEAD ] || cat "$2"
    exit 0
}

path=${target%%\?*}
query=${target#"$path"}
query=${query#\?}

# qparam NAME: raw value of NAME in the query string.
qparam() (
    set -f
    IFS='&'
    for kv in $query; do
        case "$kv" in "$1="*) printf '%s' "${kv#*=}"; return 0 ;; esac
    done
    return 1
)

urldecode() {
    printf '%b' "$(printf '%s' "$1" | sed 's/+/ /g; s/\\/\\\\/g; s/%\([0-9A-Fa-f][0-9A-Fa-f]\)/\\x\1/g')"
}

# The data disk: first whole disk vd*, sd*, hd* that is not the GRIDVMBOOT volume.
datadisk() {
    for sys in /sys/block/vd? /sys/block/sd? /sys/block/hd?; do
        [ -e "$sys" ] || continue
        dev=/dev/${sys##*/}
        [ -b "$dev" ] || continue
        [ "$(cat "$sys/size")" -gt 0 ] || continue
        dd if="$dev" bs=512 count=1 2>/dev/null | strings | grep -q GRIDVMBOOT && continue
        echo "$dev"
        return 0
    done
    return 1
}

# mbparam: validated ?mb=N (and ?dev=NAME, else the data disk) and $disk big enough,
# else a 4xx/503 reply.
mbparam() {
    mb=$(qparam mb) || mb=1
    case "$mb" in ''|*[!0-9]*) reply 400 "bad mb" ;; esac
    if dev=$(qparam dev); then
        case "$dev" in ''|*[!a-z]*) reply 400 "bad dev" ;; esac
        [ -b "/dev/$dev" ] || reply 503 "no disk $dev"
        disk=/dev/$dev
    else
        disk=$(datadisk) || reply 503 "no disk"
    fi
    size=$(cat "/sys/block/${disk#/dev/}/size")
    [ $((mb * 2048)) -le "$size" ] || reply 400 "disk too small"
}

elapsed() { awk -v a="$1" -v b="$(cut -d' ' -f1 /proc/uptime)" 'BEGIN { d = b - a; if (d < 0.01) d = 0.01; printf "%.2f", d }'; }

case "$path" in
    /)
        reply 200 "$(hostname)"
        ;;
    /health)
        reply 200 ok
        ;;
    /uptime)
        reply 200 "$(cut -d' ' -f1 /proc/uptime)"
        ;;
    /bootid)
        reply 200 "$(cat /proc/sys/kernel/random/boot_id)"
        ;;
    /burn)
        secs=$(qparam seconds) || secs=10
        case "$secs" in ''|*[!0-9]*) reply 400 "bad seconds" ;; esac
        timeout -s KILL "$secs" sh -c 'while :; do :; done' </dev/null >/dev/null 2>&1 &
        reply 200 "burning $secs"
        ;;
    /sleep)
        secs=$(qparam seconds) || secs=1
        case "$secs" in ''|*[!0-9]*) reply 400 "bad seconds" ;; esac
        sleep "$secs"
        reply 200 "$(hostname)"
        ;;
    /write)
        mbparam
        t0=$(cut -d' ' -f1 /proc/uptime)
        dd if=/dev/zero of="$disk" bs=1M count="$mb" oflag=direct conv=fsync 2>"$tmp.err" \
            || reply 500 "write failed: $(tail -n 1 "$tmp.err")"
        s=$(elapsed "$t0")
        reply 200 "wrote $mb MB in $s s = $(awk -v m="$mb" -v s="$s" 'BEGIN { printf "%.1f", m / s }') MB/s"
        ;;
    /fill)
        mbparam
        t0=$(cut -d' ' -f1 /proc/uptime)
        dd if=/dev/urandom of="$disk" bs=1M count="$mb" conv=fsync 2>"$tmp.err" \
            || reply 500 "fill failed: $(tail -n 1 "$tmp.err")"
        reply 200 "filled $mb MB in $(elapsed "$t0") s"
        ;;
    /sum)
        mbparam
        sum=$(dd if="$disk" bs=1M count="$mb" iflag=direct 2>/dev/null | md5sum)
        reply 200 "${sum%% *}"
        ;;
    /cpus)
        reply 200 "$(cat /sys/devices/system/cpu/online)"
        ;;
    /disks)
        # name:serial (gridvm gives virtio disks their vdev as serial) of every whole disk
        out=
        for sys in /sys/block/vd* /sys/block/sd* /sys/block/hd*; do
            [ -e "$sys" ] && out="$out${sys##*/}:$(cat "$sys/serial" 2>/dev/null) "
        done
        reply 200 "${out% }"
        ;;
    /nics)
        # name:MAC of every interface but lo
        out=
        for sys in /sys/class/net/*; do
            [ "${sys##*/}" = lo ] || out="$out${sys##*/}:$(cat "$sys/address") "
        done
        reply 200 "${out% }"
        ;;
    /mark)
        # a value kept in memory (tmpfs): ?set=VALUE changes it
        if v=$(qparam set); then
            case "$v" in ''|*[!A-Za-z0-9._-]*) reply 400 "bad value" ;; esac
            printf '%s' "$v" >/run/mark
        fi
        reply 200 "$(cat /run/mark 2>/dev/null)"
        ;;
    /crash)
        (sleep 0.3; echo c >/proc/sysrq-trigger) </dev/null >/dev/null 2>&1 &
        reply 200 crashing
        ;;
    /fetch)
        url=$(qparam url) || reply 400 "no url"
        url=$(urldecode "$url")
        # (this busybox wget crashes with -T: the timeout applet bounds it instead)
        timeout -s KILL 5 wget -S -O "$tmp" "$url" 2>"$tmp.err" </dev/null
        code=$(grep -o 'HTTP/[0-9.]* [0-9][0-9][0-9]' "$tmp.err" | tail -n 1 | cut -d' ' -f2)
        if [ -z "$code" ]; then
            { echo "status 0"; tail -n 1 "$tmp.err"; } >"$tmp.out"
        else
            { echo "status $code"; cat "$tmp" 2>/dev/null; } >"$tmp.out"
        fi
        mv "$tmp.out" "$tmp"
        reply_file 200 "$tmp"
        ;;
    *)
        reply 404 "not found"
        ;;
esac
