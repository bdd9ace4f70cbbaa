#!/usr/bin/env bash
# Captures real QEMU live-migration streams for the relay's parser fixtures: for each QEMU
# that prepare.sh provides (the system's 7.2, and 10.0 from bookworm-backports as QEMU10=),
# a small guest (128 MiB, same kernel and initramfs as the QEMU tests) migrates to a plain TCP
# listener that writes every connection to its own file, in the order QEMU opened them:
#   <out>/<version>/precopy/conn0.bin                 precopy, the one main channel
#   <out>/<version>/multifd/conn0.bin                 multifd: the main channel
#   <out>/<version>/multifd/conn1.bin, conn2.bin      multifd: the two multifd channels
# and prints the first 64 bytes of each in hex and what it finds in it: the main channel's
# header, configuration, RAM blocks, sections and RAM record flags up to the first device
# section; a multifd channel's init message (its channel id) and first packets. Nothing answers on these connections (no
# return path), which is what precopy and multifd need from the destination.
# Writes under ${COMMONGROUND_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/commonground}/qemu/streams/
# (or $1); never into the repository. Exits 77 when prepare.sh cannot provide QEMU.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${COMMONGROUND_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/commonground}/qemu
out=${1:-$cache/streams}
command -v python3 >/dev/null || { echo "capture-streams.sh: needs python3" >&2; exit 77; }

set +e
vars=$(bash "$here/prepare.sh")
rc=$?
set -e
[ $rc = 0 ] || exit $rc
eval "$(echo "$vars" | grep -E '^(QEMU|QEMU10|KERNEL|INITRD)=' | sed 's/^/export /')"

capture() { # <label> <qemu binary>
    local label=$1 bin=$2 mode
    for mode in precopy multifd; do
        rm -rf "$out/$label/$mode"
        mkdir -p "$out/$label/$mode"
        python3 - "$bin" "$out/$label/$mode" "$mode" <<'PY'
import atexit, json, os, socket, subprocess, sys, tempfile, threading, time

qemu, outdir, mode = sys.argv[1], sys.argv[2], sys.argv[3]
tmp = tempfile.mkdtemp(prefix="cg-capture-")
qmp_path = os.path.join(tmp, "qmp.sock")
vm = subprocess.Popen(
    [qemu, "-accel", "tcg", "-machine", "pc", "-m", "128M", "-smp", "1",
     "-nodefaults", "-no-user-config", "-display", "none",
     "-serial", "file:" + os.path.join(tmp, "serial.log"),
     "-kernel", os.environ["KERNEL"], "-initrd", os.environ["INITRD"],
     "-append", "console=ttyS0 quiet panic=-1 alloc_mib=4 dirty_mib_s=0",
     "-qmp", "unix:%s,server=on,wait=off" % qmp_path],
    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
atexit.register(vm.kill)

def wait_for(what, cond, secs):
    deadline = time.time() + secs
    while not cond():
        if vm.poll() is not None:
            sys.exit("QEMU exited: %s" % vm.stderr.read().decode())
        if time.time() > deadline:
            sys.exit("timed out waiting for " + what)
        time.sleep(0.1)

wait_for("the QMP socket", lambda: os.path.exists(qmp_path), 30)
qmp = socket.socket(socket.AF_UNIX)
qmp.connect(qmp_path)
qf = qmp.makefile("rw")
qf.readline()  # greeting

def cmd(execute, **args):
    msg = {"execute": execute}
    if args:
        msg["arguments"] = args
    qf.write(json.dumps(msg) + "\n")
    qf.flush()
    while True:
        r = json.loads(qf.readline())
        if "return" in r:
            return r["return"]
        if "error" in r:
            sys.exit("%s: %s" % (execute, r["error"]))

cmd("qmp_capabilities")
serial = os.path.join(tmp, "serial.log")
wait_for("the guest", lambda: "cg-dirtier: ready" in open(serial, errors="replace").read(), 300)

listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(16)
port = listener.getsockname()[1]
threads = []

def sink(conn, path):
    with open(path, "wb") as f:
        while True:
            b = conn.recv(1 << 20)
            if not b:
                break
            f.write(b)
    conn.close()

def accept_all():
    n = 0
    listener.settimeout(1.0)
    while not done.is_set():
        try:
            c, _ = listener.accept()
        except socket.timeout:
            continue
        t = threading.Thread(target=sink, args=(c, os.path.join(outdir, "conn%d.bin" % n)))
        t.start()
        threads.append(t)
        n += 1

done = threading.Event()
acceptor = threading.Thread(target=accept_all, daemon=True)
acceptor.start()
if mode == "multifd":
    cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
    cmd("migrate-set-parameters", **{"multifd-channels": 2})
cmd("migrate", uri="tcp:127.0.0.1:%d" % port)
deadline = time.time() + 120
while True:
    st = cmd("query-migrate")
    if st.get("status") in ("completed", "failed", "cancelled"):
        break
    if time.time() > deadline:
        cmd("migrate_cancel")
        done.set()
        sys.exit("migration did not end: %s" % st)
    time.sleep(0.2)
vm.kill()
vm.wait()
done.set()
acceptor.join()
for t in threads:
    t.join()
print("%s %s: migration %s, %s" % (os.path.basename(os.path.dirname(outdir)), mode,
      st.get("status"), st.get("error-desc", "")), file=sys.stderr)
PY
    done
}

capture 7.2 "$QEMU"
if [ -n "${QEMU10:-}" ]; then capture 10.0 "$QEMU10"; else echo "capture-streams.sh: no QEMU 10 (see prepare.sh)" >&2; fi

for f in "$out"/*/*/conn*.bin; do
    printf '%s (%s bytes)\n' "${f#"$out"/}" "$(stat -c %s "$f")"
    od -An -tx1 -N64 -v "$f"
done
python3 - "$out"/*/*/conn*.bin <<'PY'
import struct,sys,collections
def main(path):
    d=open(path,'rb').read(); p=0
    def u8():
        nonlocal p; v=d[p]; p+=1; return v
    def be32():
        nonlocal p; v=struct.unpack('>I',d[p:p+4])[0]; p+=4; return v
    def be64():
        nonlocal p; v=struct.unpack('>Q',d[p:p+8])[0]; p+=8; return v
    def s():
        nonlocal p; n=u8(); v=d[p:p+n]; p+=n; return v.decode()
    assert d[:4]==b'QEVM'; p=4; print(' version',be32())
    secs=[]; names={}
    stats=collections.Counter(); flags=collections.Counter()
    while p<len(d):
        t=u8()
        if t==7:
            n=be32(); print(' config:',d[p:p+n], 'next byte',hex(d[p+n])); p+=n; continue
        if t in (1,4):
            sid=be32(); name=s(); inst=be32(); ver=be32(); names[sid]=name
            secs.append((t,sid,name,inst,ver))
            if name!='ram':
                print(' first non-ram section: type',t,'id',sid,name,'inst',inst,'ver',ver,'at',p); break
        elif t in (2,3):
            sid=be32(); secs.append((t,sid))
        elif t==8:
            cmd=struct.unpack('>H',d[p:p+2])[0]; ln=struct.unpack('>H',d[p+2:p+4])[0]; p+=4+ln; print(' command',cmd,ln); continue
        elif t==0x7e:
            print('footer?'); continue
        elif t==0: print(' EOF'); break
        else: print(' unknown',t,'at',p); break
        # ram section body
        while True:
            a=be64(); f=a & 0xfff; flags[f]+=1
            if f & 0x04:
                total=a & ~0xfff
                rem=total
                while rem>0:
                    nm=s(); ln=be64(); rem-=ln; print('  block',nm,hex(ln))
            if f & 0x200: pass
            if f & (0x02|0x08|0x40|0x100) and not f & 0x20:
                nm=s()
            if f & 0x02: p+=1; stats['zero']+=1
            if f & 0x08: p+=4096; stats['page']+=1
            if f & 0x10: break
            if f & ~(0x02|0x04|0x08|0x10|0x20|0x200|0x100): print(' flag?',hex(f)); return
        ft=u8()
        if ft==0x7e: fid=be32()
        else: print(' no footer, byte',ft); p-=1
    print(' sections (first 6):',secs[:6],'total ram sections',len(secs))
    print(' ram records by flags',dict(flags),dict(stats))
def mf(path):
    d=open(path,'rb').read()
    magic,ver=struct.unpack('>II',d[:8]); cid=d[24]
    print(' init: magic %x version %d id %d'%(magic,ver,cid))
    p=64; n=0
    while p<len(d) and n<4:
        magic,ver,flags,alloc,normal,nxt=struct.unpack('>IIIIII',d[p:p+24]); num=struct.unpack('>Q',d[p+24:p+32])[0]
        z=struct.unpack('>I',d[p+32:p+36])[0]
        block=d[p+64:p+320].split(b'\0')[0]
        print(' packet @%d: magic %x ver %d flags %x pages_alloc %d normal %d next %d num %d word@32 %d block %s'%(p,magic,ver,flags,alloc,normal,nxt,num,z,block))
        p+=320+8*128+4096*normal; n+=1
for f in sys.argv[1:]:
    print(f.split('/streams/')[-1])
    if 'conn0' in f: main(f)
    else: mf(f)
PY
