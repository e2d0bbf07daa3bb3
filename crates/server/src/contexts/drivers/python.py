# nanoclaw's Python code-context driver: run by `python3 -c` inside a
# sandbox (embedded in the nanoclaw binary, never written to disk).
#
# Protocol (see crates/server/src/contexts/mod.rs):
#   in  (fd 0 at start, moved to a private fd): one JSON line per cell,
#       {"code": str, "env": {str: str}}.
#   out: the user's output goes raw to fd 1 / fd 2, as any program's would.
#       Control records are MARK + JSON + "\n" on fd 1 (MARK = "\x1e" + the
#       context's nonce): ready, number_of_executions, result, error, end.
#       Each cell ends with an end record on fd 1 AND on fd 2, so the daemon
#       knows both streams are drained.
import ast
import base64
import builtins
import io
import json
import linecache
import os
import sys
import traceback
import types

_NONCE = os.environ.pop("NANOCLAW_CONTEXT_NONCE", "")
_CWD = os.environ.pop("NANOCLAW_CONTEXT_CWD", "")
_MARK = ("\x1e" + _NONCE).encode()
os.environ.setdefault("MPLBACKEND", "Agg")
# Debian keeps matplotlib's rc file in /etc, which a sandbox's synthetic
# /etc lacks; its copy under /usr serves the same.
if not os.path.exists("/etc/matplotlibrc"):
    for _rc in ("/usr/share/matplotlib/mpl-data/matplotlibrc",):
        if os.path.exists(_rc):
            os.environ.setdefault("MATPLOTLIBRC", _rc)
            break

# Requests come on a private descriptor; the user's stdin is /dev/null.
_REQ = os.dup(0)
_null = os.open(os.devnull, os.O_RDONLY)
os.dup2(_null, 0)
os.close(_null)
sys.stdin = open(os.devnull)


def _text_stream(fd):
    # Line-buffered: a print() is one chunk, flushed at its newline (and at
    # the end of the cell).
    raw = io.BufferedWriter(io.FileIO(fd, "w", closefd=False))
    return io.TextIOWrapper(raw, encoding="utf-8", errors="backslashreplace",
                            line_buffering=True)


sys.stdout = sys.__stdout__ = _text_stream(1)
sys.stderr = sys.__stderr__ = _text_stream(2)


def _write(fd, data):
    while data:
        try:
            n = os.write(fd, data)
        except InterruptedError:
            continue
        data = data[n:]


def _record(obj, fd=1):
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        pass
    _write(fd, _MARK + json.dumps(obj, default=str).encode() + b"\n")


_FORMATS = (
    ("_repr_html_", "html"),
    ("_repr_markdown_", "markdown"),
    ("_repr_svg_", "svg"),
    ("_repr_png_", "png"),
    ("_repr_jpeg_", "jpeg"),
    ("_repr_latex_", "latex"),
    ("_repr_json_", "json"),
    ("_repr_javascript_", "javascript"),
)


def _plain(value):
    text = repr(value)
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]  # as E2B's server shows strings
    return text


def _display(value, main):
    out = {"type": "result", "text": _plain(value), "is_main_result": main}
    for method, key in _FORMATS:
        f = getattr(type(value), method, None)
        if f is None:
            continue
        try:
            data = f(value)
        except Exception:
            continue
        if isinstance(data, tuple):
            data = data[0]
        if data is None:
            continue
        if isinstance(data, bytes):
            data = base64.b64encode(data).decode()
        out[key] = data
    _record(out)


def display(*values):
    """Shows values as results of the cell (IPython's display)."""
    for v in values:
        _display(v, False)


def _is_figure(value):
    mod = type(value).__module__ or ""
    return mod.startswith("matplotlib.") and hasattr(value, "savefig")


def _figure(fig, main):
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", bbox_inches="tight")
    except Exception as e:  # a figure that cannot be drawn
        _write(2, f"nanoclaw: could not render a figure: {e}\n".encode())
        return
    _record({"type": "result", "text": repr(fig), "is_main_result": main,
             "png": base64.b64encode(buf.getvalue()).decode()})


def _flush_figures(main=None):
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return
    for num in plt.get_fignums():
        fig = plt.figure(num)
        if fig is not main:
            _figure(fig, False)
    plt.close("all")
    if getattr(plt.show, "__module__", "") != __name__:
        plt.show = lambda *a, **k: _flush_figures()


_main = types.ModuleType("__main__")
_main.__dict__["__builtins__"] = builtins
_main.__dict__["display"] = display
sys.modules["__main__"] = _main
_NS = _main.__dict__
_COUNT = 0


def _traceback(e):
    tb = e.__traceback__
    while tb is not None and not tb.tb_frame.f_code.co_filename.startswith("<cell-"):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(e), e, tb))


def _run(code):
    global _COUNT
    _COUNT += 1
    name = f"<cell-{_COUNT}>"
    linecache.cache[name] = (len(code), None, code.splitlines(True), name)
    _record({"type": "number_of_executions", "execution_count": _COUNT})
    tree = ast.parse(code, filename=name, mode="exec")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    exec(compile(tree, name, "exec"), _NS)
    if last is not None:
        value = eval(compile(last, name, "eval"), _NS)
        if value is not None:
            _NS["_"] = value
            if _is_figure(value):
                _flush_figures(main=value)
                _figure(value, True)
            else:
                _flush_figures()
                _display(value, True)


def _cell(req):
    env = req.get("env") or {}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        _run(req.get("code", ""))
    except BaseException as e:  # SystemExit and KeyboardInterrupt too, as Jupyter
        _record({"type": "error", "name": type(e).__name__, "value": str(e),
                 "traceback": _traceback(e)})
    finally:
        try:
            _flush_figures()
        except BaseException as e:
            _write(2, f"nanoclaw: figures: {e}\n".encode())
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _lines():
    buf = b""
    while True:
        try:
            chunk = os.read(_REQ, 1 << 16)
        except KeyboardInterrupt:
            continue  # an interrupt that came after its cell ended
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line


def _main_loop():
    try:
        if _CWD:
            os.chdir(_CWD)
    except OSError as e:
        _record({"type": "ready", "error": f"cannot use {_CWD!r} as the working directory: {e.strerror}"})
        return
    _record({"type": "ready"})
    for line in _lines():
        try:
            req = json.loads(line)
        except ValueError:
            continue
        try:
            _cell(req)
        except KeyboardInterrupt:
            pass
        # Both streams end with an end record; an interrupt between them
        # must not lose one.
        for fd in (1, 2):
            while True:
                try:
                    _record({"type": "end"}, fd)
                    break
                except KeyboardInterrupt:
                    continue


_main_loop()
