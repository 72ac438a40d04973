#!/usr/bin/env python3
"""Atom side by side with rsync, zstd --patch-from and casync on the same image pairs.

For each pair of root trees (old -> new) and each build mode (plain: the new image built
from scratch; layout-stable: built with --base old.img) it measures, in one run:

  * bytes over the wire: Atom precomputed delta, Atom rsync endpoint (signature up + delta
    down, against a real atom-dist on 127.0.0.1), Atom full payload; rsync -z
    --no-whole-file -B 4096 against an rsync daemon on 127.0.0.1 (sent + received);
    zstd -19 --long=31 --patch-from; casync (chunks of the new image missing from the old
    image's store);
  * time to bring the inactive slot (a loop device) to the new image and verify it with
    atom-update, vs rsync onto a copy of the old image;
  * bytes atom-update wrote to the slot vs the 4 KiB blocks that differ;
  * atom-update's peak RssAnon, and atom-dist's CPU seconds for one uncached diff.

Every output is checked: the slot must verify (atom-update does), rsync's result and the
zstd patch must reproduce the new image byte for byte. A mismatch exits non-zero.

Run through tests/bench.sh (installs packages, builds the binaries).
"""

import argparse
import hashlib
import json
import mmap
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path

BLOCK = 4096
MIB = 1 << 20


def run(cmd, **kw):
    kw.setdefault("check", True)
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    try:
        return subprocess.run([str(c) for c in cmd], **kw)
    except subprocess.CalledProcessError as e:
        sys.exit(f"bench: {' '.join(map(str, cmd))} failed ({e.returncode}):\n{e.stdout}\n{e.stderr}")


def digest(path):
    h = hashlib.blake2b()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MIB):
            h.update(chunk)
    return h.hexdigest()


def differing_blocks(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        ma = mmap.mmap(fa.fileno(), 0, access=mmap.ACCESS_READ)
        mb = mmap.mmap(fb.fileno(), 0, access=mmap.ACCESS_READ)
        n = min(len(ma), len(mb)) // BLOCK
        diff = sum(ma[i * BLOCK:(i + 1) * BLOCK] != mb[i * BLOCK:(i + 1) * BLOCK] for i in range(n))
        return diff, n


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measured(cmd):
    """Runs cmd; returns its wall time and peak RSS (KiB, file-backed pages included)."""
    with tempfile.TemporaryFile("w+") as log:
        start = time.monotonic()
        proc = subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.monotonic() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            log.seek(0)
            sys.exit(f"bench: {' '.join(map(str, cmd))} failed ({proc.returncode}):\n{log.read()}")
    return {"time": elapsed, "rss_kib": usage.ru_maxrss}


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class PeakRssAnon:
    """Polls /proc/PID/status for RssAnon while the process runs."""

    def __init__(self, proc):
        self.proc, self.peak_kib = proc, 0
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self):
        while self.proc.poll() is None:
            try:
                for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        self.peak_kib = max(self.peak_kib, int(line.split()[1]))
            except (FileNotFoundError, ProcessLookupError):
                return
            time.sleep(0.01)


class Bench:
    def __init__(self, args):
        self.args = args
        self.bin = Path(args.bin_dir)
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.size = args.slot_mib * MIB
        self.failures = []
        key = self.work / "signer"
        if not (self.work / "signer.key").exists():
            run([self.bin / "atom-build", "keygen", "--out", key])
        (self.work / "keys").mkdir(exist_ok=True)
        shutil.copy(self.work / "signer.pub", self.work / "keys" / "signer.pub")

    # ---- building -------------------------------------------------------------------

    def image(self, tree, version, out, base=None):
        cmd = [self.bin / "atom-build", "image", "--kernel", "none", "--rootfs", tree, "--version", version,
               "--size", f"{self.args.slot_mib}M", "--out", out]
        if base:
            cmd += ["--base", base]
        run(cmd)

    def publish(self, repo, images, extra=()):
        """Publishes `images` in turn into a new repository; returns the last manifest and
        the last publish's wall time and peak RSS."""
        shutil.rmtree(repo, ignore_errors=True)
        for img in images:
            timed = measured([self.bin / "atom-build", "publish", "--repo", repo, "--channel", "stable",
                              "--key", self.work / "signer.key", *extra, img])
        return tomllib.loads((repo / "channels/stable/manifest.toml").read_text()), timed

    # ---- the host disk ----------------------------------------------------------------

    def host_disk(self, old_img):
        disk = self.work / "host.img"
        disk.unlink(missing_ok=True)
        slot = self.args.slot_mib
        with open(disk, "wb") as f:
            f.truncate((2 * slot + 8) * MIB)
        script = (f"label: gpt\nstart=2048, size={slot}MiB, type=4f68bce3-e8cd-4db1-96e7-fbcaf984b709, "
                  f"name=root-a\nsize={slot}MiB, type=4f68bce3-e8cd-4db1-96e7-fbcaf984b709, name=root-b\n")
        run(["sfdisk", "--quiet", disk], input=script)
        loop = run(["losetup", "-f", "--show", disk]).stdout.strip()
        self.put(old_img, loop, 0)
        run(["cgpt", "add", "-i", "1", "-P", "1", "-T", "0", "-S", "1", loop])
        return loop

    def put(self, img, loop, slot):
        """Writes `img` into slot 0 (A) or 1 (B) of the host disk."""
        seek = 1 + slot * self.args.slot_mib
        run(["dd", f"if={img}", f"of={loop}", "bs=1M", f"seek={seek}", "conv=notrunc,fsync", "status=none"])

    def agent(self, loop, repo_url, route, version, old_img):
        # The inactive slot holds the version before, as on a host that updated before.
        self.put(old_img, loop, 1)
        run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"])
        state = self.work / "agent-state"
        shutil.rmtree(state, ignore_errors=True)
        (self.work / "boot.toml").write_text(
            f'slot = "A"\nlabel = "root-a"\npartition = 1\npartuuid = "x"\ndisk = "{loop}"\n'
            'reason = "bench"\ntrial = false\ntries_left = 0\nstate = "none"\n')
        (self.work / "release").write_text(f'version = "{version}"\nboard = "x86_64-generic"\n')
        cfg = self.work / "update.toml"
        cfg.write_text(
            f'repositories = ["{repo_url}"]\nchannel = "stable"\nboard = "x86_64-generic"\n'
            f'keys_dir = "{self.work / "keys"}"\nstate_dir = "{state}"\n'
            f'boot_record = "{self.work / "boot.toml"}"\nrelease_file = "{self.work / "release"}"\n'
            f'routes = ["{route}"]\n')
        run(["cgpt", "add", "-i", "2", "-P", "0", "-T", "0", "-S", "0", loop])
        start = time.monotonic()
        proc = subprocess.Popen([self.bin / "atom-update", "--config", cfg, "now"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        peak = PeakRssAnon(proc)
        out, err = proc.communicate()
        elapsed = time.monotonic() - start
        peak.thread.join()
        if proc.returncode != 0:
            self.failures.append(f"atom-update ({route}) failed: {err.strip().splitlines()[-1:]}")
            return None
        status = json.loads(run([self.bin / "atom-update", "--config", cfg, "status", "--json"]).stdout)
        last = status["last_update"]
        return {"time": elapsed, "rss_kib": peak.peak_kib, "written": last["bytes_written"],
                "down": last["bytes_downloaded"], "up": last.get("bytes_uploaded", 0)}

    # ---- the others ---------------------------------------------------------------------

    def rsync(self, old_img, new_img):
        d = self.work / "rsyncd"
        shutil.rmtree(d, ignore_errors=True)
        (d / "mod").mkdir(parents=True)
        os.link(new_img, d / "mod" / "new.img") if os.stat(new_img).st_dev == os.stat(d).st_dev \
            else shutil.copy(new_img, d / "mod" / "new.img")
        port = free_port()
        conf = d / "rsyncd.conf"
        conf.write_text(f"address = 127.0.0.1\nport = {port}\nuse chroot = no\npid file = {d}/pid\n"
                        f"[mod]\npath = {d / 'mod'}\nread only = yes\nuid = root\ngid = root\n")
        daemon = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={conf}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(100):
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        break
                time.sleep(0.05)
            dest = self.work / "rsync-dest.img"
            shutil.copy(old_img, dest)
            run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"])
            start = time.monotonic()
            out = run(["rsync", "-z", "--no-whole-file", "-B", "4096", "--inplace", "--stats",
                       f"rsync://127.0.0.1:{port}/mod/new.img", dest]).stdout
            elapsed = time.monotonic() - start
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait()
        sent = int(re.search(r"Total bytes sent: ([\d,]+)", out).group(1).replace(",", ""))
        recv = int(re.search(r"Total bytes received: ([\d,]+)", out).group(1).replace(",", ""))
        if digest(dest) != digest(new_img):
            self.failures.append("rsync's result differs from the new image")
        return {"wire": sent + recv, "time": elapsed}

    def zstd_patch(self, old_img, new_img):
        patch = self.work / "patch.zst"
        made = measured(["zstd", "-q", "-f", "-19", "--long=31", f"--patch-from={old_img}", new_img, "-o", patch])
        back = self.work / "patched.img"
        run(["zstd", "-q", "-f", "-d", "--long=31", f"--patch-from={old_img}", patch, "-o", back])
        if digest(back) != digest(new_img):
            self.failures.append("zstd --patch-from did not reproduce the new image")
        size = patch.stat().st_size
        patch.unlink()
        back.unlink()
        return {"wire": size, "make": made}

    def casync(self, old_img, new_img):
        old_store, new_store = self.work / "ca-old", self.work / "ca-new"
        for s in (old_store, new_store):
            shutil.rmtree(s, ignore_errors=True)
        run(["casync", "make", f"--store={old_store}", self.work / "old.caibx", old_img])
        run(["casync", "make", f"--store={new_store}", self.work / "new.caibx", new_img])
        have = {p.name for p in old_store.rglob("*.cacnk")}
        missing = [p for p in new_store.rglob("*.cacnk") if p.name not in have]
        return {"wire": sum(p.stat().st_size for p in missing), "chunks": len(missing)}

    # ---- one pair ----------------------------------------------------------------------

    def pair(self, name, old_tree, new_tree):
        for mode in ("plain", "layout-stable"):
            old_img, new_img = self.work / "old.img", self.work / "new.img"
            self.image(old_tree, "1.0.0", old_img)
            self.image(new_tree, "2.0.0", new_img, base=old_img if mode == "layout-stable" else None)
            diff, blocks = differing_blocks(old_img, new_img)
            # The channel: 1.0.0, 1.5.0 (the new tree), then 2.0.0 published with deltas
            # from both: the publish row.
            mid_img = self.work / "mid.img"
            self.image(new_tree, "1.5.0", mid_img, base=old_img if mode == "layout-stable" else None)
            repo = self.work / "repo"
            manifest, publish = self.publish(repo, [old_img, mid_img, new_img], extra=("--deltas", "2"))
            payload = manifest["payload"]["size"]
            delta = next(d for d in manifest["deltas"] if d["base_version"] == "1.0.0")
            publish["deltas"] = len(manifest["deltas"])
            publish["format"] = delta["format"]
            delta = delta["size"]
            loop = self.host_disk(old_img)
            dist = None
            try:
                pre = self.agent(loop, f"file://{repo}", "precomputed", "1.0.0", old_img)
                dist, port = self.serve(repo, self.work / "dist-cache")
                # A host whose version the channel never published (0.9.0 here, the same
                # bytes) sends its signature for a block-level diff. (On 1.0.0 the target's
                # own delta from it is the precomputed route's; the rsync endpoint's answer
                # from a published base is the "skipped a version" row.)
                cpu0 = cpu_seconds(dist.pid)
                rs = self.agent(loop, f"http://127.0.0.1:{port}", "rsync", "0.9.0", old_img)
                dist_cpu = cpu_seconds(dist.pid) - cpu0
                full = self.agent(loop, f"file://{repo}", "full", "1.0.0", old_img)
                dist.terminate()
                dist.wait()
                dist = None
                skipped = self.skipped_version(loop, old_img, mid_img, new_img)
            finally:
                if dist:
                    dist.terminate()
                    dist.wait()
                run(["losetup", "-d", loop], check=False)
            rsync = self.rsync(old_img, new_img)
            zstd = self.zstd_patch(old_img, new_img)
            ca = self.casync(old_img, new_img)
            self.report(name, mode, diff, blocks, payload, delta, pre, rs, full, skipped, dist_cpu,
                        rsync, zstd, ca, publish)

    def serve(self, repo, cache):
        """atom-dist on a free loopback port with an empty cache, once it listens."""
        port = free_port()
        shutil.rmtree(cache, ignore_errors=True)
        dist = subprocess.Popen([self.bin / "atom-dist", "serve", "--repo", repo, "--listen",
                                 f"127.0.0.1:{port}", "--cache", cache],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        dist.stdout.readline()
        return dist, port

    def skipped_version(self, loop, old_img, mid_img, new_img):
        """A host still on 1.0.0 while the channel is at 2.0.0 with a delta from 1.5.0 only
        (the new tree again as 1.5.0): no precomputed delta fits it, the rsync endpoint
        answers from its published base."""
        repo = self.work / "repo-skipped"
        self.publish(repo, [old_img, mid_img, new_img], extra=("--deltas", "1"))
        dist, port = self.serve(repo, self.work / "dist-cache-skipped")
        try:
            return self.agent(loop, f"http://127.0.0.1:{port}", "rsync", "1.0.0", old_img)
        finally:
            dist.terminate()
            dist.wait()

    def report(self, name, mode, diff, blocks, payload, delta, pre, rs, full, skipped, dist_cpu,
               rsync, zstd, ca, publish):
        def mib(n):
            if n is None:
                return "-"
            return f"{n / MIB:.2f} MiB" if n >= MIB else f"{n / 1024:.1f} KiB"

        def secs(t):
            return f"{t:.2f} s" if t is not None else "-"

        print(f"\n### {name}, {mode} build ({self.args.slot_mib} MiB slots; "
              f"{diff} of {blocks} 4 KiB blocks differ = {diff * BLOCK / MIB:.2f} MiB)\n")
        print("| method | over the wire | apply + verify | written to the slot | agent peak RssAnon |")
        print("|---|---:|---:|---:|---:|")
        rows = [
            ("Atom precomputed delta", delta, pre),
            ("Atom rsync endpoint, unknown base (signature up + delta down)", rs and rs["up"] + rs["down"], rs),
            ("Atom full payload", payload, full),
            ("Atom, skipped a version (on 1.0.0, deltas from 1.5.0 only): rsync endpoint",
             skipped and skipped["up"] + skipped["down"], skipped),
            ("rsync -z --no-whole-file -B 4096 (sent + received)", rsync["wire"], {"time": rsync["time"]}),
            ("zstd -19 --long=31 --patch-from", zstd["wire"], None),
            (f"casync (missing chunks: {ca['chunks']})", ca["wire"], None),
        ]
        for label, wire, r in rows:
            r = r or {}
            rss = r.get("rss_kib")
            print(f"| {label} | {mib(wire)} | {secs(r.get('time'))} | {mib(r.get('written'))} | "
                  f"{mib(rss * 1024) if rss else '-'} |")
        rss = max((r["rss_kib"] for r in (pre, rs, full, skipped) if r), default=0)
        print(f"\natom-dist CPU for one uncached diff: {dist_cpu:.2f} s\n")
        print("| making it | wall time | peak RSS |")
        print("|---|---:|---:|")
        print(f"| atom-build publish (payload + {publish['deltas']} deltas, {publish['format']}) | "
              f"{secs(publish['time'])} | {mib(publish['rss_kib'] * 1024)} |")
        print(f"| zstd -19 --long=31 --patch-from (one patch) | {secs(zstd['make']['time'])} | "
              f"{mib(zstd['make']['rss_kib'] * 1024)} |\n")
        goals = [
            ("precomputed delta <= 1.15 x zstd --patch-from", delta / max(zstd["wire"], 1), 1.15),
            ("skipped a version <= 1.2 x precomputed delta",
             (skipped["up"] + skipped["down"]) / max(delta, 1) if skipped else None, 1.2),
            ("rsync endpoint, unknown base total <= 0.75 x rsync total",
             (rs["up"] + rs["down"]) / rsync["wire"] if rs else None, 0.75),
            ("apply + verify time <= rsync time", pre["time"] / rsync["time"] if pre else None, 1.0),
            ("RssAnon <= 32 MiB", rss / 1024 / 32, 1.0),
            ("publish with 2 deltas <= 60 s", publish["time"] / 60, 1.0),
            ("publish peak RSS <= 1 GiB", publish["rss_kib"] / (1 << 20), 1.0),
        ]
        if mode == "layout-stable":
            goals.append(("bytes written <= 1.5 x differing blocks",
                          pre["written"] / max(diff * BLOCK, 1) if pre else None, 1.5))
        if self.args.small:
            print("* goals: not checked in the small run: on 64 MiB busybox images the timings are "
                  "sub-second and say nothing about 1 GiB images (`bash tests/bench.sh` checks them); "
                  "here every number is produced and every output verified")
            goals = []
        for label, ratio, limit in goals:
            if ratio is None:
                verdict = "not measured"
            else:
                verdict = ("met" if ratio <= limit else "MISSED") + f" (ratio {ratio:.2f}, limit {limit})"
            print(f"* goal: {label}: {verdict}")
        sys.stdout.flush()


def busybox_tree(root, variant):
    """A small root for the CI run: busybox plus bulk; variants change or add files."""
    shutil.rmtree(root, ignore_errors=True)
    (root / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin/busybox")
    doc = root / "usr/share/doc/sample"
    doc.mkdir(parents=True)
    data = Path("/bin/busybox").read_bytes()
    for i in range(40):
        blob = bytearray(data[: 20000 + 9000 * i])
        if variant >= 1 and i % 10 == 3:
            blob[5000:9000] = bytes(4000)  # a "security update" of a few files
        (doc / f"blob{i}").write_bytes(blob)
    if variant >= 2:
        (root / "usr/lib/added").mkdir(parents=True)
        for i in range(8):
            (root / f"usr/lib/added/pkg{i}").write_bytes(data[i * 1000:] + bytes([i]))


def debian_tree(root, suite, security, extra, keep=False):
    if keep and root.is_dir() and (root / "usr/bin").is_dir():
        print(f"# reusing {root} (--keep-trees)")
        return
    shutil.rmtree(root, ignore_errors=True)
    sources = [f"deb http://deb.debian.org/debian {suite} main"]
    if security:
        sources += [f"deb http://deb.debian.org/debian-security {suite}-security main",
                    f"deb http://deb.debian.org/debian {suite}-updates main"]
    pkgs = ["systemd-sysv", "udev", "openssh-server", "curl", "ca-certificates", "less", "procps"] + extra
    run(["mmdebstrap", "--quiet", "--variant=minbase", f"--include={','.join(pkgs)}",
         "--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/locale/*",
         "--customize-hook=rm -f $1/etc/machine-id $1/var/cache/ldconfig/aux-cache",
         suite, root, *sources])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin-dir", required=True)
    p.add_argument("--work", help="work directory (default: a new one under /tmp, removed after a passing run)")
    p.add_argument("--keep", action="store_true", help="keep the default work directory after a passing run")
    p.add_argument("--small", action="store_true", help="busybox trees, 64 MiB slots (the CI check)")
    p.add_argument("--suite", default="bookworm")
    p.add_argument("--only", choices=["security", "added"],
                   help="run one Debian pair: security updates, or added packages")
    p.add_argument("--keep-trees", action="store_true",
                   help="reuse Debian trees already in the work dir (a rerun with the same packages)")
    args = p.parse_args()
    made_work = args.work is None
    if made_work:
        args.work = tempfile.mkdtemp(prefix="atom-bench.")
    args.slot_mib = 64 if args.small else 1024
    b = Bench(args)
    w = Path(args.work)
    print(f"# Atom benchmark ({'small, CI' if args.small else 'Debian images'}), work dir {w}")
    if args.small:
        for v in range(3):
            busybox_tree(w / f"tree{v}", v)
        b.pair("security-style update (a few files change)", w / "tree0", w / "tree1")
        b.pair("added packages", w / "tree1", w / "tree2")
    else:
        if args.only != "added":
            debian_tree(w / "point", args.suite, False, [], args.keep_trees)
        debian_tree(w / "security", args.suite, True, [], args.keep_trees)
        if args.only != "security":
            debian_tree(w / "added", args.suite, True, ["python3", "rsync", "vim-tiny"], args.keep_trees)
        if args.only != "added":
            b.pair(f"Debian {args.suite} point release -> with security updates", w / "point", w / "security")
        if args.only != "security":
            b.pair(f"Debian {args.suite} -> the same plus python3, rsync, vim-tiny", w / "security", w / "added")
    if b.failures:
        print("\nFAILED:\n" + "\n".join(f"  {f}" for f in b.failures))
        sys.exit(1)
    print("\nall outputs verified")
    if made_work and not args.keep:
        shutil.rmtree(w, ignore_errors=True)
    else:
        print(f"work files kept in {w}")


if __name__ == "__main__":
    main()
