"""Credentials at the boundary, driven by the unmodified `e2b` SDK:
`Sandbox.create(network={"allow_out": [...], "rules": {...}})` and
`Sandbox.update_network(...)` as the SDK sends them, against
`nanoclaw serve` whose sandboxes reach a test host in a network namespace
that crates/cli/tests/e2b_sdk.rs made (api.test and web.test, HTTPS from a
test CA the daemon trusts through NANOCLAW_UPSTREAM_CA).

The test host answers `auth-ok` when a request carried
`Authorization: Bearer $NANOCLAW_RULES_SECRET`, `auth-ok2` for the rotated
`$NANOCLAW_RULES_SECRET2`, `auth-missing` without the header — never the
header itself. The secrets are the SDK caller's (the client side, as in
E2B); the sandbox must never see them.

Settings (besides conftest.py's): NANOCLAW_RULES_SECRET,
NANOCLAW_RULES_SECRET2, NANOCLAW_RULES_HALVES (`h1:h2:h1b:h2b`: each secret
in two halves, so the search inside the sandbox never holds a whole one).
Without them the module is skipped: it needs the test host.
"""

from __future__ import annotations

import os

import pytest

from conftest import missing_settings, require_e2b, skip_message

NEEDED = ("NANOCLAW_RULES_SECRET", "NANOCLAW_RULES_SECRET2", "NANOCLAW_RULES_HALVES")

pytestmark = [
    pytest.mark.skipif(
        bool(missing_settings()) and not require_e2b(),
        reason=skip_message(missing_settings()),
    ),
    pytest.mark.skipif(
        any(not os.environ.get(k) for k in NEEDED),
        reason="needs the test host that crates/cli/tests/e2b_sdk.rs makes "
        "(network_rules_from_the_e2b_sdk_reach_the_host_and_never_the_sandbox)",
    ),
]

# The search every check ends with: a secret (assembled only in a pipe) in
# no file of the sandbox's writable or synthetic folders (the rest is the
# host's read-only /usr and /lib), no environment, no command line.
SEARCH = r"""
pat() { printf '%s%s\n' "$H1" "$H2"; }
pat | grep -r -s -l -F -f /dev/stdin /etc /tmp /home /root /run /var /workspace /code 2>/dev/null | sed 's/^/leak-file:/'
pat | grep -s -l -F -f /dev/stdin /proc/[0-9]*/environ /proc/[0-9]*/cmdline | sed 's/^/leak-proc:/'
env | (pat | grep -c -F -f /dev/stdin -) | sed 's/^/env-hits:/'
echo searched:done
"""

NOPROXY = "env -u HTTP_PROXY -u HTTPS_PROXY -u ALL_PROXY -u http_proxy -u https_proxy -u all_proxy"


def rule(secret: str) -> dict:
    return {"api.test": [{"transform": {"headers": {"Authorization": f"Bearer {secret}"}}}]}


def fields(out: str) -> dict:
    return dict(line.split(":", 1) for line in out.splitlines() if ":" in line)


def verdicts(sbx) -> dict:
    """What the test host answered: curl without proxy variables (the
    transparent path), curl through the proxy variables, Python's urllib;
    all over HTTPS, trusting only what the sandbox trusts."""
    script = f"""
echo "curl:$({NOPROXY} curl -s --max-time 10 https://api.test/t)"
echo "curl-proxy:$(curl -s --max-time 10 -H 'Authorization: Bearer placeholder' https://api.test/p)"
python3 -c 'import urllib.request; print("python:" + urllib.request.urlopen("https://api.test/u", timeout=10).read().decode().strip())'
"""
    return fields(sbx.commands.run(script, timeout=60).stdout)


def assert_never_inside(sbx):
    h1, h2, h1b, h2b = os.environ["NANOCLAW_RULES_HALVES"].split(":")
    for a, b in ((h1, h2), (h1b, h2b)):
        out = sbx.commands.run(f"H1='{a}'; H2='{b}'\n{SEARCH}", timeout=120).stdout
        assert "searched:done" in out, out
        leaks = [line for line in out.splitlines() if line.startswith("leak-")]
        assert not leaks, f"the secret is readable inside the sandbox: {leaks}"
        assert fields(out)["env-hits"] == "0", out


def test_rules_from_create_and_update_network(make_sandbox, e2b_target):
    import httpx

    s1 = os.environ["NANOCLAW_RULES_SECRET"]
    s2 = os.environ["NANOCLAW_RULES_SECRET2"]
    sbx = make_sandbox(network={"allow_out": ["api.test", "web.test"], "rules": rule(s1)})
    v = verdicts(sbx)
    assert (v["curl"], v["curl-proxy"], v["python"]) == ("auth-ok", "auth-ok", "auth-ok"), v
    # The sandbox trusts a CA made for it, not the test host's.
    issuer = sbx.commands.run(
        f"echo | {NOPROXY} openssl s_client -connect api.test:443 -servername api.test 2>/dev/null"
        " | openssl x509 -noout -issuer",
        timeout=30,
    ).stdout
    assert "nanoclaw sandbox" in issuer, issuer
    assert_never_inside(sbx)

    # A rotated token, as the SDK sends an update (rules replace the old).
    sbx.update_network({"allow_out": ["api.test", "web.test"], "rules": rule(s2)})
    v = verdicts(sbx)
    assert (v["curl"], v["python"]) == ("auth-ok2", "auth-ok2"), v

    # A rule for a domain the sandbox's CA was not made for: 409, nothing
    # changed.
    url = f"{e2b_target.api_url}/sandboxes/{sbx.sandbox_id}/network"
    key = {"X-API-Key": e2b_target.key_a}
    bad = {"allowOut": ["api.test", "web.test"], "rules": {"web.test": [{"transform": {"headers": {"X-K": "v"}}}]}}
    r = httpx.put(url, json=bad, headers=key)
    assert r.status_code == 409, r.text
    assert "covers only api.test" in r.json()["message"], r.text
    r = httpx.put(url, json={"allowOut": ["api.test"], "rules": {"api.test": [{"transform": {"headers": {"Host": "x"}}}]}}, headers=key)
    assert r.status_code == 400 and "Host" in r.json()["message"], r.text
    assert verdicts(sbx)["curl"] == "auth-ok2"

    # An update without rules clears them (E2B: omitted fields are cleared).
    sbx.update_network({"allow_out": ["api.test", "web.test"]})
    out = sbx.commands.run(f"{NOPROXY} curl -s -k --max-time 10 https://api.test/none", timeout=30).stdout
    assert out.strip() == "auth-missing", out
    assert_never_inside(sbx)

    # Audited, with the rules' domains and header names, never a value.
    updates = httpx.get(
        e2b_target.api_url + "/v1/audit",
        params={"sandbox": sbx.sandbox_id, "kind": "network_update"},
        headers=key,
    ).json()
    assert len(updates) == 2, updates
    recs = httpx.get(
        e2b_target.api_url + "/v1/audit", params={"sandbox": sbx.sandbox_id}, headers=key
    ).json()
    assert any("api.test: Authorization" in (r.get("detail") or "") for r in updates), updates
    text = repr(recs)
    assert s1 not in text and s2 not in text


def test_rules_on_a_sandbox_created_without_any_are_refused(make_sandbox, e2b_target):
    import httpx

    sbx = make_sandbox(network={"allow_out": ["api.test"]})
    r = httpx.put(
        f"{e2b_target.api_url}/sandboxes/{sbx.sandbox_id}/network",
        json={"allowOut": ["api.test"], "rules": rule("x")},
        headers={"X-API-Key": e2b_target.key_a},
    )
    assert r.status_code == 409, r.text
    assert "created without credential rules" in r.json()["message"], r.text
    out = sbx.commands.run(f"{NOPROXY} curl -s -k --max-time 10 https://api.test/plain", timeout=30).stdout
    assert out.strip() == "auth-missing", out
