"""Find, start, watch and stop a Triton Inference Server process (stdlib and the contract's names only).

Two layouts are supported: an NGC container (``tritonserver`` on PATH or under
/opt/tritonserver, backends in /opt/tritonserver/backends) and the server bundled
in the ``nvidia-pytriton`` wheel (the Python backend stub must be copied in).

A watchdog restores models whose Python-backend stub process died (see StubWatchdog).
"""
from __future__ import annotations

import contextlib
import filecmp
import importlib.util
import json
import os
import logging
import re
import secrets
import shutil
import signal
import site
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import cosine
from cosine.contract import DEPLOYMENT_SECRET_ENV, DRAFTER_MODEL_PREFIX, engine_of

OPT_ROOT = Path("/opt/tritonserver")
LOG_TAIL_LINES = 40
STUB_BINARY = "triton_python_backend_stub"
# Explicit model control opens the repository API (load/unload) to every client; the launcher restricts it to
# requests carrying this header with a random per-server value only it knows.
ADMIN_HEADER = "cosine-admin-key"
ADMIN_APIS = "model-repository,logging,trace"
# Measured: while Triton loads the target, the cosine model's responses to the requests that just failed on the dead
# target are held until the load completes (seconds); while the model is merely unloaded, calls to it fail at once.
# A pause between unload and load lets in-flight requests fail and be answered first.
UNLOADED_GRACE_S = 2.0
SERVER_RESTORE = "tritonserver"  # the watchdog's restores count whole-server restarts under this name

log = logging.getLogger("cosine.launcher")


class LaunchError(RuntimeError):
    """Triton could not be found, validated, started or made ready."""


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backend_dir: Path
    stubs_dir: Path | None = None  # set for the nvidia-pytriton wheel layout only


def find_tritonserver() -> TritonInstall:
    """Locate tritonserver: PATH, then /opt/tritonserver/bin, then the nvidia-pytriton wheel."""
    for candidate in (shutil.which("tritonserver"), OPT_ROOT / "bin" / "tritonserver"):
        if candidate and os.access(candidate, os.X_OK):
            binary = Path(candidate).resolve()
            for backends in (binary.parent.parent / "backends", OPT_ROOT / "backends"):
                if (backends / "python").is_dir():
                    return TritonInstall(binary, backends)
            raise LaunchError(f"found {binary} but no backends directory with a python backend "
                              f"next to it or in {OPT_ROOT / 'backends'}")
    # find_spec locates the package without importing it.
    spec = importlib.util.find_spec("pytriton")
    if spec is not None and spec.origin:
        root = Path(spec.origin).parent / "tritonserver"
        if (root / "bin" / "tritonserver").is_file():
            return TritonInstall(root / "bin" / "tritonserver", root / "backends",
                                 root / "python_backend_stubs")
    raise LaunchError("tritonserver not found: not on PATH, not in /opt/tritonserver/bin, and the "
                      "nvidia-pytriton wheel is not installed (run `make venv` or `pip install nvidia-pytriton`)")


def install_python_stub(install: TritonInstall) -> None:
    """Copy the Python backend stub matching the running interpreter into the backend dir (wheel layout)."""
    if install.stubs_dir is None:
        return  # container layout: the stub ships with the backend
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    src = install.stubs_dir / version / "triton_python_backend_stub"
    if not src.is_file():
        raise LaunchError(f"nvidia-pytriton has no Python backend stub for Python {version} ({src})")
    dst = install.backend_dir / "python" / "triton_python_backend_stub"
    if not (dst.is_file() and filecmp.cmp(src, dst, shallow=False)):
        tmp = dst.with_suffix(".tmp")
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)  # atomic, in case another server is starting concurrently


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free now: bound together, so that none is handed out twice (chosen one at a time and
    released at once, a second server's port came out equal to a first one's that was not listening yet)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in sockets]


def port_in_use(port: int) -> bool:
    # SO_REUSEADDR ignores TIME_WAIT leftovers but still fails against a live listener,
    # including one bound to 127.0.0.1 only (Triton binds 0.0.0.0).
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False


def python_backend_path() -> str:
    """Value for COSINE_PYTHONPATH: the Python backend stub ignores PYTHONPATH, our model.py files read this."""
    entries = [str(Path(cosine.__file__).resolve().parent.parent), *site.getsitepackages()]
    entries += filter(None, os.environ.get("COSINE_PYTHONPATH", "").split(os.pathsep))
    return os.pathsep.join(dict.fromkeys(entries))  # de-duplicated, order kept


def stub_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The server's environment, minus any activated virtualenv.

    The Python backend stub embeds the system libpython and finds its standard library through the first
    `python3` on PATH: an activated venv of another CPython build would hand it a mismatched one."""
    env = {key: value for key, value in environ.items() if key not in ("VIRTUAL_ENV", "PYTHONHOME")}
    # engine processes share the cores: OpenMP threads that spin while waiting would starve each other
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    path = [entry for entry in env.get("PATH", "").split(os.pathsep)
            if entry and not (Path(entry).parent / "pyvenv.cfg").is_file()]
    env["PATH"] = os.pathsep.join(["/usr/bin", *(entry for entry in path if entry != "/usr/bin")])
    return env


def validate_repository(path: Path) -> None:
    if not path.is_dir():
        raise LaunchError(f"model repository {path} is invalid: not a directory")
    # Triton only looks at <repository>/<model>/config.pbtxt.
    if not any(path.glob("*/config.pbtxt")):
        raise LaunchError(f"model repository {path} is invalid: no <model>/config.pbtxt in it")


def process_stat(pid: int | str) -> list[str]:
    """/proc/<pid>/stat's fields from the third (state) on: past the command name, which may hold spaces and ')'.
    Raises OSError when the process is gone."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def stub_alive(pid: int, server_pid: int) -> bool:
    """Whether this pid is still a live (not zombie) child of the server: one read of /proc/<pid>/stat (17 us here)
    where stub_processes reads every process's (2-3 ms with a server's processes)."""
    try:
        state, parent = process_stat(pid)[:2]
    except OSError:
        return False
    return state != "Z" and int(parent) == server_pid


def stub_processes(server_pid: int) -> dict[int, str]:
    """The live Python-backend stubs of a server, {pid: model name}. A killed stub is gone, or a zombie child of
    the server until reaped: either way it is not listed."""
    stubs = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        if not stub_alive(int(entry.name), server_pid):
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # exited meanwhile
            continue
        if argv[0].endswith(STUB_BINARY.encode()):
            stubs[int(entry.name)] = Path(argv[1].decode()).parent.parent.name  # <repo>/<model>/<version>/model.py
    return stubs


class StubWatchdog:
    """Restores a model whose Python-backend stub process died (kill -9, the OOM killer, a crash in native code).

    Measured on Triton 2.51: after such a death Triton neither restarts the stub nor marks the model (or the
    server, even with strict readiness) unready, and every call to the model fails after ~1 s with "Stub process
    '<instance>' is not healthy", for good. Its repository API (load/unload, explicit model control) is the
    supported way back. The watchdog lives in the launcher: it owns the server process whose children the stubs
    are, while a model can neither see other models' processes nor survive its own death. It polls /proc (cheap,
    and it sees a death before any call has to wait on it), then restores the model:
    - a drafter, or a target replica while another replica lives: loaded again in place (Triton swaps the new
      instance in when it is ready). The deployment serves without it meanwhile (requests go on without a failed
      drafter; new sequences go to the other target replicas), so readiness stays true. Triton reloads a loaded
      model only when its configuration changed (measured: a second plain load is a no-op), so the load carries the
      model's own configuration plus a restore count;
    - the target's last replica and every other model: unloaded, then loaded (after UNLOADED_GRACE_S). While
      unloaded it is not ready, so strict readiness (/v2/health/ready) tells load balancers that this server cannot
      serve, and new calls to it fail at once.
      (Calls already queued at the dead instance wait until the model is back; the cosine model does not wait for
      them, see cosine.triton.io.)
    If tritonserver itself dies, it is started again. Restores are counted per model (`restores`; whole-server
    restarts as SERVER_RESTORE) and logged. The launcher is no Triton model and Triton 2.51 has no metric for model
    loads, so the scrapeable counters come from the serving side: the cosine model counts the deaths and comebacks
    of the models it calls (cosine_model_process_deaths_total, cosine_model_restores_total)."""

    def __init__(self, server: "TritonServer", load_timeout: float, interval_s: float = 0.25):
        self.server, self.load_timeout, self.interval_s = server, load_timeout, interval_s
        self.restores: Counter[str] = Counter()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cosine-stub-watchdog", daemon=True)
        self._watched: dict[int, str] = {}

    def start(self) -> None:
        self._watched = stub_processes(self.server.process.pid)  # before returning: a death right after counts
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if threading.current_thread() is not self._thread:  # a failed restart stops the server from here
            self._thread.join()

    def join(self) -> None:
        self._thread.join()

    def _run(self) -> None:
        watched = self._watched
        retired: set[int] = set()  # a restored model's other, old instances: they exit on their own
        while not self._stopping.wait(self.interval_s):
            process = self.server.process
            if process.poll() is not None:
                if not self._restart_server(process.returncode):
                    return
                watched, retired = stub_processes(self.server.process.pid), set()
                continue
            alive = stub_processes(process.pid)
            dead = sorted({model for stub, model in watched.items() if stub not in alive})
            for model in dead:
                retired |= {stub for stub, name in alive.items() if name == model}
                # another replica of the same engine (the target's) lives: the deployment serves on meanwhile
                replicas = {name for name in alive.values()
                            if name not in dead and engine_of(name) == engine_of(model)}
                self._restore(model, in_place=model.startswith(DRAFTER_MODEL_PREFIX) or bool(replicas))
            if dead:
                alive = stub_processes(process.pid)
            retired &= alive.keys()
            watched = {stub: model for stub, model in alive.items() if stub not in retired}

    def _restore(self, model: str, in_place: bool) -> None:
        started = time.monotonic()
        log.warning("model %s: its Python backend stub died; restoring it (%s)", model,
                    "in place" if in_place else "unloaded until then: the server reports not ready")

        def restore() -> None:
            if in_place:
                config = self.server.model_config(model)
                config.setdefault("parameters", {})["cosine_restore"] = {"string_value": str(self.restores[model] + 1)}
                self.server.repository_call(model, "load", self.load_timeout, {"config": json.dumps(config)})
            else:
                self.server.repository_call(model, "unload", self.load_timeout)
                time.sleep(UNLOADED_GRACE_S)
                self.server.repository_call(model, "load", self.load_timeout)

        try:
            if not self._while_server_lives(restore):
                return  # the loop restarts the server
        except (urllib.error.URLError, OSError) as error:
            detail = error.read().decode(errors="replace") if isinstance(error, urllib.error.HTTPError) else error
            log.error("model %s: restoring failed: %s", model, detail)
            return
        self.restores[model] += 1
        log.warning("model %s restored in %.1f s", model, time.monotonic() - started)

    def _while_server_lives(self, call) -> bool:
        """Runs `call` (it raises or returns); False if the server died (or is being stopped) first. A dead
        server's orphaned stubs inherited its sockets, so a request in progress would wait for its timeout."""
        pool = ThreadPoolExecutor(1)
        future = pool.submit(call)
        pool.shutdown(wait=False)
        while not wait([future], timeout=self.interval_s).done:
            if self.server.process.poll() is not None or self._stopping.is_set():
                return False
        future.result()
        return True

    def _restart_server(self, code: int) -> bool:
        """The last resort: tritonserver itself died. Seen on Triton 2.51 in about 1 of 10 drafter kills under load:
        restoring the model aborts the server with an uncaught boost::interprocess::lock_exception from the Python
        backend (a known class of its bugs; the killed stub presumably held a lock in their shared memory)."""
        log.error("tritonserver exited with code %s; starting it again. Last lines of %s:\n%s", code,
                  self.server.log_path, self.server.log_tail())
        started = time.monotonic()
        try:
            self.server.relaunch(self.load_timeout)
        except LaunchError as error:
            log.error("restarting tritonserver failed: %s", error)
            return False
        self.restores[SERVER_RESTORE] += 1
        log.warning("tritonserver restarted in %.1f s", time.monotonic() - started)
        return True


class TritonServer:
    """A tritonserver process. Use as a context manager, or call start()/stop()."""

    def __init__(self, model_repository: str | os.PathLike, http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, log_path: str | os.PathLike | None = None,
                 extra_args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 restore_models: bool = True, exit_timeout: int = 5):
        self.model_repository = Path(model_repository).resolve()
        self.ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        if log_path is None:
            log_path = Path(tempfile.mkdtemp(prefix="cosine-triton-")) / "tritonserver.log"
        self._log_path = Path(log_path).resolve()
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.restore_models = restore_models
        self.watchdog: StubWatchdog | None = None
        self.admin_key = secrets.token_urlsafe(24)  # see ADMIN_HEADER
        # Triton's default (30 s) waits that long on any idle keep-alive client connection at shutdown.
        self.exit_timeout = exit_timeout
        # A distinct shm prefix per server, so that several can run on one machine.
        self.shm_prefix = f"cosine_{os.getpid()}_{http_port}_"
        self.process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics']}/metrics"

    @property
    def log_path(self) -> Path:
        return self._log_path

    def command(self, install: TritonInstall) -> list[str]:
        cmd = [str(install.binary), f"--model-repository={self.model_repository}",
               f"--backend-directory={install.backend_dir}",
               f"--http-port={self.ports['http']}", f"--grpc-port={self.ports['grpc']}",
               f"--metrics-port={self.ports['metrics']}",
               f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
               "--log-verbose=0", "--exit-on-error=true", f"--exit-timeout-secs={self.exit_timeout}",
               # the configs are complete; auto-completing would start every Python model's stub twice per load
               "--disable-auto-complete-config",
               # the APIs that change the server, not just use it: only with the launcher's admin key
               f"--http-restricted-api={ADMIN_APIS}:{ADMIN_HEADER}={self.admin_key}",
               f"--grpc-restricted-protocol={ADMIN_APIS}:{ADMIN_HEADER}={self.admin_key}"]
        if self.restore_models:  # the watchdog loads models through the repository API
            cmd += ["--model-control-mode=explicit", "--load-model=*"]
        return cmd + self.extra_args

    def start(self, timeout: float = 300.0) -> "TritonServer":
        """Validate, launch, and wait until the server reports ready."""
        if self.process is not None:
            raise LaunchError("server already started")
        validate_repository(self.model_repository)
        for name, port in self.ports.items():
            if port_in_use(port):
                raise LaunchError(f"{name} port {port} is already in use (choose another with --{name}-port)")
        install = find_tritonserver()
        install_python_stub(install)
        env = {**stub_environment(os.environ), **self.env, "COSINE_PYTHONPATH": python_backend_path()}
        if not env.get(DEPLOYMENT_SECRET_ENV):  # nodes of one deployment share theirs through the environment
            env[DEPLOYMENT_SECRET_ENV] = secrets.token_urlsafe(32)
        self._launch_args = (self.command(install), env)
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_path.write_bytes(b"")  # a restart appends: the crash stays in the log
        self._launch(timeout)
        if self.restore_models:
            self.watchdog = StubWatchdog(self, load_timeout=timeout)
            self.watchdog.start()
        return self

    def _launch(self, timeout: float) -> None:
        command, env = self._launch_args
        with open(self._log_path, "ab") as log:
            # Own process group: Ctrl-C in our terminal must not hit the server or its stubs directly.
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def relaunch(self, timeout: float) -> None:
        """Starts the server again after it died: same ports, secret and admin key."""
        self._reap(self.process)
        self._launch(timeout)

    def wait(self) -> int | None:
        """Blocks while the server runs, through the watchdog's restarts; its exit code once it is down for good."""
        if self.watchdog is not None:
            self.watchdog.join()
        return self.process.wait() if self.process else None

    @property
    def restores(self) -> Counter:
        """Models restored by the watchdog since the start, and how often."""
        return self.watchdog.restores if self.watchdog else Counter()

    def repository_call(self, model: str, action: str, timeout: float, parameters: dict | None = None) -> None:
        """POST /v2/repository/models/<model>/<action> (load, unload) with the admin key."""
        body = json.dumps({"parameters": parameters} if parameters else {}).encode()
        request = urllib.request.Request(f"http://{self.http_url}/v2/repository/models/{model}/{action}", body,
                                         {ADMIN_HEADER: self.admin_key}, method="POST")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()

    def model_config(self, model: str) -> dict:
        with urllib.request.urlopen(f"http://{self.http_url}/v2/models/{model}/config", timeout=10) as response:
            return json.loads(response.read())

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self._log_path.read_text(errors="replace")
        except OSError:
            return ""
        # Triton prints its ~20-line options table last on exit; drop it so the model status
        # table (with the Python traceback of a model that failed to load) stays in the tail.
        text = re.sub(r"^\+[-+]+\n\| Option .*?\n\n", "", text, flags=re.S | re.M)
        return "".join(text.splitlines(keepends=True)[-lines:])

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process is None:
                raise LaunchError("server not started")
            code = self.process.poll()
            if code is not None:
                raise LaunchError(f"tritonserver exited with code {code} before becoming ready; "
                                  f"last lines of {self._log_path}:\n{self.log_tail()}")
            if self.is_ready():
                return
            if time.monotonic() > deadline:
                raise LaunchError(f"tritonserver not ready after {timeout:.0f}s; "
                                  f"last lines of {self._log_path}:\n{self.log_tail()}")
            time.sleep(0.25)

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGINT (graceful unload), then SIGKILL the whole group. Returns the exit code."""
        if self.watchdog is not None:  # first: the stubs exit with the server, and must not be restored
            self.watchdog.stop()
            self.watchdog = None
        proc, self.process = self.process, None
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(self.exit_timeout + 30 if timeout is None else timeout)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            self._reap(proc)
        return proc.returncode

    def _reap(self, proc: subprocess.Popen) -> None:
        # Also reaps stub processes left behind by a crashed or killed server.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        # Python backend regions a killed server could not unlink.
        for leftover in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            leftover.unlink(missing_ok=True)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
