"""Run the images ``scripts/build_images.sh`` built, each as its Kubernetes pod would run it.

No kubelet runs here (shared/STACK.md), so this module does its part for one container, from the
rendered objects and nothing retyped: the command and args with ``$(VAR)`` expanded from the
container's environment (``$$`` is a literal ``$``); the environment from ``envFrom`` ConfigMaps, then
``env`` (values, ``secretKeyRef``, ``configMapKeyRef``, ``fieldRef``); every ``volumeMount`` as a bind
mount of a host directory: a PersistentVolumeClaim's from the test, a fresh directory per emptyDir,
files written from a Secret's or ConfigMap's data. The container runs with ``buildah run
--isolation chroot --network host --user <runAsUser>:<runAsGroup>``; a hosts file the test gives stands
in for the cluster's DNS (Service names and pod hostnames on loopback).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MACHINE_CACHE = Path("/var/cache/lorafleet/images")


def _image_cache() -> Path:
    """Where scripts/buildah_storage.sh keeps the images: $LORAFLEET_IMAGE_CACHE, else the machine-wide
    directory when it can be created and written, else .cache/images of the repository."""
    if os.environ.get("LORAFLEET_IMAGE_CACHE"):
        return Path(os.environ["LORAFLEET_IMAGE_CACHE"])
    try:
        MACHINE_CACHE.mkdir(parents=True, exist_ok=True)
    except OSError:
        return REPO / ".cache" / "images"
    return MACHINE_CACHE if os.access(MACHINE_CACHE, os.W_OK) else REPO / ".cache" / "images"


CACHE = _image_cache()
BUILD_SCRIPT = REPO / "scripts" / "build_images.sh"
_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def buildah() -> list[str]:
    """buildah on the storage scripts/build_images.sh built into (scripts/buildah_storage.sh)."""
    driver_file = CACHE / "storage-driver"
    assert driver_file.is_file(), f"{driver_file} missing: run `make images BUILDER=buildah` first"
    driver = driver_file.read_text(encoding="utf-8").strip()
    return [
        "buildah",
        "--root",
        str(CACHE / "storage"),
        "--runroot",
        str(CACHE / "run"),
        "--storage-driver",
        driver,
    ]


def built_images() -> dict[str, str]:
    """NAME -> NAME:TAG of every image the build script builds (``--list``), at the default tag."""
    proc = subprocess.run(["bash", str(BUILD_SCRIPT), "--list"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return {line.split()[0]: f"{line.split()[0]}:0.1.0" for line in proc.stdout.splitlines() if line.strip()}


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: known variables are replaced, unknown ones kept, ``$$`` -> ``$``."""

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR.sub(one, text)


@dataclass
class PodContainer:
    """One container of a rendered pod, resolved against this host."""

    argv: list[str]
    env: dict[str, str]
    mounts: list[tuple[Path, str, bool]]
    """(host directory or file, path in the container, read-only)."""
    user: str


@dataclass
class Cluster:
    """What the objects refer to: ConfigMaps, Secrets, claims (host directories), pod fields."""

    config_maps: list[dict[str, Any]]
    secrets: dict[str, dict[str, str]]
    claims: dict[str, Path]
    scratch: Path
    field_refs: dict[str, str] = field(default_factory=dict)

    def config_map(self, name: str) -> dict[str, str]:
        [cm] = [c for c in self.config_maps if c["metadata"]["name"] == name]
        return dict(cm.get("data") or {})


def resolve(pod: dict[str, Any], container_name: str, cluster: Cluster) -> PodContainer:
    """``pod`` (a pod spec) -> its container ``container_name``, as the kubelet would start it."""
    [c] = [c for c in pod["containers"] if c["name"] == container_name]
    env: dict[str, str] = {}
    for source in c.get("envFrom") or []:
        env.update(cluster.config_map(source["configMapRef"]["name"]))
    for e in c.get("env") or []:
        if "value" in e:
            env[e["name"]] = expand(e["value"], env)
            continue
        ref = e["valueFrom"]
        if "secretKeyRef" in ref:
            s = ref["secretKeyRef"]
            value = cluster.secrets.get(s["name"], {}).get(s["key"])
            if value is None:
                assert s.get("optional"), f"env {e['name']}: Secret {s['name']}/{s['key']} missing"
                continue
        elif "configMapKeyRef" in ref:
            value = cluster.config_map(ref["configMapKeyRef"]["name"])[ref["configMapKeyRef"]["key"]]
        else:
            value = cluster.field_refs[ref["fieldRef"]["fieldPath"]]
        env[e["name"]] = value
    argv = [expand(a, env) for a in (c.get("command") or []) + (c.get("args") or [])]
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    mounts = []
    for m in c.get("volumeMounts") or []:
        mounts.append((_volume_dir(volumes[m["name"]], cluster), m["mountPath"], bool(m.get("readOnly"))))
    sc = {**(pod.get("securityContext") or {}), **(c.get("securityContext") or {})}
    return PodContainer(argv, env, mounts, f"{sc['runAsUser']}:{sc['runAsGroup']}")


def _volume_dir(volume: dict[str, Any], cluster: Cluster) -> Path:
    name = volume["name"]
    if "persistentVolumeClaim" in volume:
        return cluster.claims[volume["persistentVolumeClaim"]["claimName"]]
    path = cluster.scratch / "volumes" / name
    path.mkdir(parents=True, exist_ok=True)
    if "emptyDir" in volume:
        path.chmod(0o1777)  # as the kubelet makes it; fsGroup would own it
        return path
    if "secret" in volume:
        data, items, mode = (
            cluster.secrets[volume["secret"]["secretName"]],
            volume["secret"].get("items"),
            0o440,
        )
        mode = volume["secret"].get("defaultMode", mode)
    else:
        data, items, mode = (
            cluster.config_map(volume["configMap"]["name"]),
            volume["configMap"].get("items"),
            0o444,
        )
    for item in items or [{"key": k, "path": k} for k in data]:
        target = path / item["path"]
        target.write_text(data[item["key"]], encoding="utf-8")
        target.chmod(mode)
        os.chown(target, 0, 1000)  # fsGroup
    return path


def in_root(rootfs: Path, path: str) -> str:
    """``path`` with the image's own symlinks resolved inside ``rootfs`` (``/var/run`` -> ``/run`` on
    Debian), as the container runtime resolves a mount target; buildah's chroot isolation does not."""
    parts: list[str] = []
    todo = [p for p in path.split("/") if p]
    hops = 0
    while todo:
        part = todo.pop(0)
        if part == "..":
            parts = parts[:-1]
            continue
        candidate = rootfs.joinpath(*parts, part)
        if candidate.is_symlink():
            hops += 1
            assert hops < 40, f"{path}: too many symlinks in the image"
            link = os.readlink(candidate)
            todo = [p for p in link.split("/") if p] + todo
            parts = [] if link.startswith("/") else parts
            continue
        parts.append(part)
    return "/" + "/".join(parts)


class ImageRun:
    """``buildah run`` of one image as a pod's container; ``stop`` ends it and removes the container."""

    def __init__(self, image: str, container: PodContainer, log: Path, hosts: dict[str, str]) -> None:
        self.log = log
        proc = subprocess.run(
            [*buildah(), "from", "--pull=never", image], capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, f"buildah from {image}: {proc.stderr}"
        self.container_id = proc.stdout.strip().splitlines()[-1]
        hosts_file = log.parent / f"{log.stem}.hosts"
        hosts_file.write_text(
            "127.0.0.1 localhost\n" + "".join(f"{ip} {name}\n" for name, ip in hosts.items()),
            encoding="utf-8",
        )
        cmd = [*buildah(), "run", "--isolation", "chroot", "--network", "host", "--user", container.user]
        cmd += ["--no-hosts", "--volume", f"{hosts_file}:/etc/hosts:ro"]
        self.rootfs = Path(
            subprocess.run(
                [*buildah(), "mount", self.container_id],
                capture_output=True,
                text=True,
                timeout=120,
                check=True,
            ).stdout.strip()
        )
        self.mount_targets = ["/etc/hosts"]
        for host, path, read_only in container.mounts:
            target = in_root(self.rootfs, path)
            self.mount_targets.append(target)
            cmd += ["--volume", f"{host}:{target}" + (":ro" if read_only else "")]
        for key, value in container.env.items():
            cmd += ["--env", f"{key}={value}"]
        cmd += [self.container_id, "--", *container.argv]
        self._out = log.open("wb")
        self.started = time.time() - 1.0
        self.root_writes: list[str] | None = None
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def written(self) -> list[str]:
        """Every path (in the container) that its writable layer holds: what the container created,
        changed or deleted in the image's filesystem, outside its bind-mounted volumes.

        overlay storage: the layer's upper directory (``storage/overlay/<layer>/diff``), exactly the
        copied-up, new and whited-out entries. vfs storage has no separate upper layer (the container's
        root is a full copy), so there: every entry of the root whose ctime is after the run started.
        """
        driver = buildah()[-1]
        if driver == "overlay":
            records = json.loads((CACHE / "storage" / "overlay-containers" / "containers.json").read_text())
            [layer] = [
                r["layer"] for r in records if r["id"] == self.container_id or self.container_id in r["names"]
            ]
            upper, since = CACHE / "storage" / "overlay" / layer / "diff", None
        else:
            upper, since = self.rootfs, self.started
        paths = []
        for directory, dirs, files in os.walk(upper):
            for name in dirs + files:
                path = Path(directory, name)
                if since is None or path.lstat().st_ctime >= since:
                    paths.append("/" + str(path.relative_to(upper)))
        return sorted(paths)

    def written_outside_volumes(self) -> list[str]:
        """``written()`` less what a read-only root filesystem allows: anything under ``/tmp`` (an
        emptyDir in every pod), and the empty directories the runtime itself creates as mount points:
        each volume's target and its parents, and ``/run`` (buildah run sets up its run-time mounts
        there). Directories that only hold other written entries are left out (overlay copies a
        file's parents up with it). Empty when the container would run unchanged with
        ``readOnlyRootFilesystem: true``."""
        mount_dirs = {"/run"}
        for target in self.mount_targets:
            parts = target.strip("/").split("/")
            mount_dirs.update("/" + "/".join(parts[: i + 1]) for i in range(len(parts)))
        written = self.written()
        # A directory that holds other written entries was only copied up to hold them: report those.
        parents = {str(Path(p).parent) for p in written}
        return [
            p
            for p in written
            if p not in parents
            and not (p == "/tmp" or p.startswith("/tmp/"))
            and not (p in mount_dirs and (self.rootfs / p.lstrip("/")).is_dir())
        ]

    def stop(self) -> list[str]:
        """End the container (SIGTERM, as the kubelet does, then SIGKILL after 30 s) and remove it.

        Returns ``written_outside_volumes()`` as it stood once the process had ended (the container's
        layer goes with it); a second call returns the same list."""
        if self.root_writes is not None:
            return self.root_writes
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self._out.close()
        try:
            self.root_writes = self.written_outside_volumes()
        finally:
            subprocess.run([*buildah(), "rm", self.container_id], capture_output=True, timeout=120)
        return self.root_writes
