"""E2B network options for Docker and gVisor sandboxes of `nanoclaw serve`,
driven by the unmodified `e2b` SDK and tested by attack: a sandbox made with
`network={"allow_out": ["web.test:7000"]}` reaches the allowed test host by
name from a program that ignores proxy variables (Python's own sockets and
resolver, every proxy variable unset); a name no rule allows gets NXDOMAIN;
the address of a host no rule allows, and an unlisted port of the allowed
one, are refused — and the test host's own log shows nothing but the
allowed connection reached it. The refusals are in the daemon's audit log
and `/metrics`. `update_network` replaces the policy of the running
sandbox; `allow_internet_access=False` is no network at all.

Run by crates/cli/tests/serve_backends.rs, which makes the test host (a
network namespace with addresses routed only to its veth: nothing leaves
the machine), starts the daemon with an /etc/hosts of its own naming it,
and afterwards checks that nothing is left behind. Settings (besides
conftest.py's):

    NANOCLAW_BACKEND_TEMPLATES   "docker=dk[,gvisor=gv]"
    NANOCLAW_BACKEND_IDS         a file the sandbox ids made here are appended to
    NANOCLAW_EGRESS_HOST         the allowed test host's address (web.test)
    NANOCLAW_EGRESS_OTHER        a second address no rule allows (denied.test)
    NANOCLAW_EGRESS_HITS         the test host's log: `address port` per connection
"""

from __future__ import annotations

import os

import httpx
import pytest
from e2b import Sandbox, SandboxException

NEEDED = ("NANOCLAW_BACKEND_TEMPLATES", "NANOCLAW_EGRESS_HOST", "NANOCLAW_EGRESS_OTHER", "NANOCLAW_EGRESS_HITS")

pytestmark = pytest.mark.skipif(
    any(not os.environ.get(k) for k in NEEDED),
    reason="needs the test host that crates/cli/tests/serve_backends.rs makes "
    "(e2b_network_options_hold_in_docker_and_gvisor_sandboxes)",
)

BACKENDS = ("docker", "gvisor")

# What runs in the sandbox: every proxy variable unset, then Python's own
# resolver and sockets, and a raw DNS query (its rcode) to the nameserver of
# /etc/resolv.conf (redirected to nanoclaw's DNS whatever it names). One
# line per probe: `D name address|refused`, `Q name rcode`, `R host port
# reply` or `E host port error`.
PROBE = r"""
unset HTTP_PROXY HTTPS_PROXY ALL_PROXY NO_PROXY http_proxy https_proxy all_proxy no_proxy
exec python3 - "$@" <<'EOF'
import os, socket, struct, sys
assert not any(k.lower().endswith('_proxy') for k in os.environ), os.environ
other = sys.argv[1]
def dns(n):
    try:
        print('D', n, socket.getaddrinfo(n, 7000, socket.AF_INET)[0][4][0])
    except OSError as e:
        print('D', n, 'refused', type(e).__name__)
def rcode(n):
    ns = '127.0.0.1'
    try:
        for line in open('/etc/resolv.conf'):
            f = line.split()
            if len(f) > 1 and f[0] == 'nameserver' and ':' not in f[1]:
                ns = f[1]
                break
    except OSError:
        pass
    q = struct.pack('>HHHHHH', 0x4242, 0x0100, 1, 0, 0, 0)
    for label in n.split('.'):
        q += bytes([len(label)]) + label.encode()
    q += b'\x00' + struct.pack('>HH', 1, 1)
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(10)
        s.sendto(q, (ns, 53))
        print('Q', n, s.recv(512)[3] & 15)
    except OSError as e:
        print('Q', n, 'error', type(e).__name__)
def conn(h, p):
    try:
        s = socket.create_connection((h, p), timeout=10)
        s.sendall(b'probe\n')
        print('R', h, p, s.recv(100).decode().strip())
    except OSError as e:
        print('E', h, p, type(e).__name__)
dns('web.test')
dns('denied.test')
rcode('web.test')
rcode('denied.test')
conn('web.test', 7000)
conn(other, 7000)
conn('web.test', 8080)
EOF
"""


def templates() -> dict:
    spec = os.environ["NANOCLAW_BACKEND_TEMPLATES"]
    return dict(pair.split("=", 1) for pair in spec.split(","))


def template_of(backend: str) -> str:
    t = templates().get(backend)
    if t is None:
        pytest.skip(f"no {backend} template in this run (serve_backends.rs says why)")
    return t


def make(e2b_target, registry, template: str, **kw):
    sbx = Sandbox.create(template=template, timeout=300, **e2b_target.a, **kw)
    registry.add(sbx, e2b_target.a)
    path = os.environ.get("NANOCLAW_BACKEND_IDS")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(sbx.sandbox_id + "\n")
    return sbx


def probe(sbx) -> dict:
    """The probes' lines by their first three words (`D web.test`, ...)."""
    other = os.environ["NANOCLAW_EGRESS_OTHER"]
    r = sbx.commands.run(f"cat > /tmp/probe.sh <<'PROBE_END'\n{PROBE}\nPROBE_END\nsh /tmp/probe.sh {other}", timeout=120)
    out = {}
    for line in r.stdout.splitlines():
        f = line.split(" ", 3)
        if f[0] in ("D", "Q"):
            out[f"{f[0]} {f[1]}"] = " ".join(f[2:])
        elif f[0] in ("R", "E") and len(f) >= 3:
            out[f"{f[1]}:{f[2]}"] = f"{f[0]} {' '.join(f[3:])}".strip()
    out["raw"] = r.stdout + r.stderr
    return out


def hits() -> list:
    try:
        with open(os.environ["NANOCLAW_EGRESS_HITS"], encoding="utf-8") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def denials_metric(e2b_target) -> int:
    text = httpx.get(e2b_target.api_url + "/metrics", headers={"X-API-Key": e2b_target.key_a}).text
    for line in text.splitlines():
        if line.startswith("nanoclaw_egress_denials_total "):
            return int(float(line.split()[1]))
    raise AssertionError("no nanoclaw_egress_denials_total in /metrics:\n" + text)


def audit(e2b_target, sandbox_id: str, kind: str) -> list:
    r = httpx.get(
        e2b_target.api_url + "/v1/audit",
        params={"sandbox": sandbox_id, "kind": kind},
        headers={"X-API-Key": e2b_target.key_a},
    )
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("backend", BACKENDS)
def test_allow_out_holds_for_programs_that_ignore_proxy_variables(backend, e2b_target, registry):
    template = template_of(backend)
    web, other = os.environ["NANOCLAW_EGRESS_HOST"], os.environ["NANOCLAW_EGRESS_OTHER"]
    before_hits, before_denied = len(hits()), denials_metric(e2b_target)
    sbx = make(e2b_target, registry, template, network={"allow_out": ["web.test:7000"]})
    info = Sandbox.get_info(sbx.sandbox_id, **e2b_target.a)
    assert info.metadata.get("backend") == backend, info.metadata
    p = probe(sbx)
    diag = f"[{backend}] {p['raw']}"
    # The attacks first, so that a defence that gave way is named.
    assert p.get("D denied.test", "").startswith("refused"), "a name no rule allows resolved: " + diag
    assert p.get("Q denied.test") == "3", "no NXDOMAIN for a name no rule allows: " + diag
    assert p.get(f"{other}:7000", "").startswith("E"), "a direct IP no rule allows connected: " + diag
    assert p.get("web.test:8080", "").startswith("E"), "an unlisted port connected: " + diag
    # The allowed host, by name, without proxy variables.
    assert p.get("D web.test") == web, diag
    assert p.get("Q web.test") == "0", diag
    assert p.get("web.test:7000") == "R raw-hello probe", diag
    # The test host saw the allowed connection only.
    assert hits()[before_hits:] == [f"{web} 7000"], (hits(), diag)
    # The refusals are in the audit log (written before the command's end
    # was reported) and counted in /metrics.
    recs = [r.get("detail") or "" for r in audit(e2b_target, sbx.sandbox_id, "egress_denial")]
    assert any(f"{other}:7000" in d for d in recs), (recs, diag)
    assert any(":8080" in d for d in recs), (recs, diag)
    assert denials_metric(e2b_target) >= before_denied + 2

    # Live: the policy of the running sandbox is replaced at once.
    sbx.commands.run("echo kept > /tmp/marker", timeout=30)
    sbx.update_network({"allow_out": ["web.test:8080"]})
    p = probe(sbx)
    diag = f"[{backend}] after update: {p['raw']}"
    assert p.get("web.test:7000", "").startswith("E"), "the old rule still lets through: " + diag
    assert p.get("web.test:8080") == "R unlisted probe", diag
    assert p.get("Q denied.test") == "3", diag
    Sandbox.update_network(sbx.sandbox_id, {"allow_internet_access": False}, **e2b_target.a)
    p = probe(sbx)
    diag = f"[{backend}] after allow_internet_access=False: {p['raw']}"
    assert p.get("Q web.test") == "3", diag
    assert p.get("web.test:7000", "").startswith("E") or p.get("D web.test", "").startswith("refused"), diag
    assert p.get(f"{web}:8080") is None  # (not probed by address)
    assert sbx.commands.run("cat /tmp/marker", timeout=30).stdout == "kept\n"
    updates = audit(e2b_target, sbx.sandbox_id, "network_update")
    assert len(updates) == 2, updates
    assert any("web.test:8080" in (r.get("detail") or "") for r in updates), updates
    assert hits()[before_hits:] == [f"{web} 7000", f"{web} 8080"], hits()
    sbx.kill()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_internet_access_is_no_network(backend, e2b_target, registry):
    template = template_of(backend)
    web = os.environ["NANOCLAW_EGRESS_HOST"]
    before_hits = len(hits())
    sbx = make(e2b_target, registry, template, allow_internet_access=False)
    p = probe(sbx)
    diag = f"[{backend}] {p['raw']}"
    assert p.get("D web.test", "").startswith("refused"), diag
    assert p.get("web.test:7000", "").startswith("E"), diag
    r = sbx.commands.run(
        f"python3 -c \"import socket; socket.create_connection(('{web}', 7000), timeout=10)\" 2>&1; echo rc=$?",
        timeout=60,
    )
    assert "rc=1" in r.stdout, (backend, r.stdout)
    assert hits()[before_hits:] == [], hits()
    # No proxy in it to update: a conflict with its state, saying why.
    resp = httpx.put(
        f"{e2b_target.api_url}/sandboxes/{sbx.sandbox_id}/network",
        json={"allowOut": ["web.test"]},
        headers={"X-API-Key": e2b_target.key_a},
    )
    assert resp.status_code == 409, resp.text
    assert resp.json()["message"], resp.text
    sbx.kill()


@pytest.mark.parametrize("backend", BACKENDS)
def test_what_the_backend_cannot_do_with_egress_is_a_400_naming_it(backend, e2b_target, registry):
    template = template_of(backend)
    url = e2b_target.api_url + "/sandboxes"
    key = {"X-API-Key": e2b_target.key_a}
    cases = [
        # Credential rules need the per-sandbox CA only native sandboxes get.
        (
            {"allowOut": ["web.test"], "rules": {"web.test": [{"transform": {"headers": {"Authorization": "Bearer x"}}}]}},
            "network.rules",
        ),
        # The same API checks as for native sandboxes.
        ({"allowOut": ["10.0.0.1"]}, "only public addresses"),
        ({"denyOut": ["1.2.3.4"]}, "denyOut"),
    ]
    for network, needle in cases:
        body = {"templateID": template, "timeout": 60, "network": network}
        r = httpx.post(url, json=body, headers=key)
        assert r.status_code == 400, (network, r.status_code, r.text)
        v = r.json()
        assert v["code"] == 400 and needle in v["message"], (network, v)
        if needle == "network.rules":
            assert f"the {backend} backend" in v["message"], v
    # Through the SDK too: one clear exception, nothing made.
    with pytest.raises(SandboxException) as e:
        make(e2b_target, registry, template, network={"allow_out": ["10.0.0.1"]})
    assert "400" in str(e.value), str(e.value)
