"""register_image (seed 000) against the real daemon: the build runs in a
child `nanoclaw image build`, the image becomes a template of the
caller's tenant for its languages, `images()` lists it, it survives a
restart of the daemon, and every build is in the audit log.

No network reaches Docker Hub here: `python:3.11-slim` in the test's own
image store is the local bench image (python3 and its stdlib, no pip) under
that name (conftest.image_store). Seed 000's Dockerfile is therefore run
verbatim and fails where it must (`pip` is not in that image, and RUN steps
have no network); the same call with a RUN step the reachable base can do
proves the shape works end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import write_config

MARKER_DOCKERFILE = """
FROM python:3.11-slim
RUN python3 -c "open('/built-by-register-image', 'w').write('numpy would be here')"
ENV ANALYSIS=pandas
"""


READ_MARKER = "print(open('/built-by-register-image').read())\n"


def test_seed_000_register_image_verbatim(fake, tmp_path: Path, base_image: str, monkeypatch) -> None:
    f = fake([
        {"reply": {"tool_calls": [{"name": "run_code", "input": {"language": "python", "code": READ_MARKER}}],
                   "usage": {"input_tokens": 50, "output_tokens": 20}}},
        {"reply": {"text": "The image has the marker.", "usage": {"input_tokens": 80, "output_tokens": 8}}},
    ])
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path / "config.yaml", f.port)
    from nanoclaw import NanoClaw, NanoClawError

    agent = NanoClaw(config_path="config.yaml")
    try:
        # Seed 000, verbatim: the build runs and fails on its RUN step, with
        # the build's own message (pip is not in the local base; no network).
        with pytest.raises(NanoClawError) as e:
            # 注册自定义镜像
            agent.register_image(
                name="custom-python",
                dockerfile="""
FROM python:3.11-slim
RUN pip install numpy pandas
""",
                languages=["python"]
            )
        assert e.value.status == 422, e.value
        assert "RUN pip install numpy pandas" in e.value.message
        assert "pip: not found" in e.value.message
        assert [i.name for i in agent.images()] == ["base"], "a failed build registers nothing"

        # The same call with a step the local base can run.
        img = agent.register_image(
            name="custom-python", dockerfile=MARKER_DOCKERFILE, languages=["python"]
        )
        assert img.name == "custom-python" and img.languages == ["python"]
        assert img.reference == "localhost/local/custom-python:latest"
        assert img.id and img.id.startswith("sha256:")
        listed = {i.name: i for i in agent.images()}
        assert listed["custom-python"].languages == ["python"]
        assert listed["base"].builtin and not listed["custom-python"].builtin

        # Its languages are real: python runs in its root, node is refused.
        code = "import os; print(open('/built-by-register-image').read(), os.environ['ANALYSIS'])"
        r = agent.run(code=code, language="python", template="custom-python")
        assert (r.exit_code, r.stdout) == (0, "numpy would be here pandas\n"), r.raw
        with pytest.raises(NanoClawError) as e:
            agent.run(code="1", language="node", template="custom-python")
        assert e.value.status == 400
        assert "registered for python, not node" in e.value.message
        # The host root (base) has no such file: the template is the image.
        r = agent.run(code=code, language="python")
        assert r.exit_code != 0 and "built-by-register-image" in r.stderr

        # And a sandbox made from it.
        from nanoclaw import Sandbox

        with Sandbox.create(template="custom-python", client=agent) as sbx:
            r = sbx.run(["python3", "-c", code])
            assert r.stdout == "numpy would be here pandas\n", r

        # The agent's sandbox in that image — seed 000, verbatim:
        # 使用自定义镜像
        result = agent.execute(
            prompt="使用 pandas 分析数据",
            image="custom-python"
        )
        assert result.stop == "answer", result.raw
        assert result.exit_code == 0 and result.stdout == "numpy would be here\n", result.raw
        assert f.record()["remaining"] == 0
        with pytest.raises(NanoClawError) as e:
            agent.execute(prompt="x", image="not-registered")
        assert e.value.status == 404 and "not-registered" in e.value.message
        with pytest.raises(NanoClawError) as e:
            agent.execute(prompt="x", image="custom-python", language="node")
        assert e.value.status == 400 and "registered for python, not node" in e.value.message

        builds = agent.audit(kind="image_build")
        assert len(builds) == 2, builds
        assert builds[0]["detail"].startswith("failed: image build failed:")
        assert builds[1]["detail"].startswith("localhost/local/custom-python:latest sha256:")
        assert builds[1]["tenant"] == "local"
    finally:
        agent.close()


def test_register_image_refusals_and_restart(
    fake, tmp_path: Path, base_image: str, image_store: Path
) -> None:
    f = fake([])
    config = write_config(tmp_path / "config.yaml", f.port)
    data = tmp_path / "data"
    from nanoclaw import NanoClaw, NanoClawError, Sandbox

    with NanoClaw(config_path=str(config), data_dir=str(data)) as agent:
        bad = [
            (dict(name="../x", dockerfile="FROM python:3.11-slim", languages=["python"]), "invalid name"),
            (dict(name="base", dockerfile="FROM python:3.11-slim", languages=["python"]), "default template"),
            (dict(name="x", dockerfile="", languages=["python"]), "dockerfile must not be empty"),
            (dict(name="x", dockerfile="FROM python:3.11-slim", languages=["cobol"]), "unknown language"),
            (dict(name="x", dockerfile="FROM python:3.11-slim", languages=[]), "at least one"),
            (dict(name="x", dockerfile="F" * 70000, languages=["sh"]), "at most 65536"),
            (dict(name="x", dockerfile="FROM python:3.11-slim", languages=["sh"],
                  allow_hosts=["--network=open"]), "invalid allow_hosts entry"),
        ]
        for kw, words in bad:
            with pytest.raises(NanoClawError) as e:
                agent.register_image(**kw)
            assert e.value.status == 400 and words in e.value.message, (kw["name"], e.value)
        # The build context is empty and private: COPY cannot reach out.
        with pytest.raises(NanoClawError) as e:
            agent.register_image(
                name="escape", dockerfile="FROM python:3.11-slim\nCOPY ../../etc/shadow /x\n",
                languages=["python"],
            )
        assert e.value.status == 422, e.value
        # An image that is not in the store, and no network to pull it.
        with pytest.raises(NanoClawError) as e:
            agent.register_image(name="gone", dockerfile="FROM 127.0.0.1:9/nope:1\n", languages=["sh"])
        assert e.value.status == 422
        agent.register_image(name="marker", dockerfile=MARKER_DOCKERFILE, languages=["python", "sh"])
        assert not list((data / "builds").iterdir()), "a build context was left behind"

    # A restarted daemon on the same data folder still has the template.
    with NanoClaw(config_path=str(config), data_dir=str(data)) as again:
        assert {i.name: i.languages for i in again.images()}["marker"] == ["python", "sh"]
        r = again.run(["python3", "-c", "print(open('/built-by-register-image').read())"], template="marker")
        assert r.stdout == "numpy would be here\n", r.raw
        # Removed (docker rmi): no longer a template, its own layers gone
        # (a layer another image shares stays: the build cache may have
        # given marker the same RUN layer as another test's image).
        import uuid

        layers = image_store / "images" / "layers"
        own = again.register_image(
            name="only-mine",
            dockerfile=f"FROM python:3.11-slim\nRUN python3 -c \"open('/u','w').write('{uuid.uuid4()}')\"\n",
            languages=["python"],
        )
        before = {p.name for p in layers.iterdir()}
        with Sandbox.create(template="only-mine", client=again):
            with pytest.raises(NanoClawError) as e:
                again.remove_image("only-mine")
            assert e.value.status == 409 and "live sandbox" in e.value.message, e.value
        gone = again.remove_image("only-mine")
        assert gone["id"] == own.id and gone["layers_removed"] == 1, gone
        assert len(before - {p.name for p in layers.iterdir()}) == 1
        gone = again.remove_image("marker")
        assert gone["reference"] == "localhost/local/marker:latest", gone
        assert [i.name for i in again.images()] == ["base"]
        with pytest.raises(NanoClawError) as e:
            again.run(["true"], template="marker")
        assert e.value.status == 404
        with pytest.raises(NanoClawError) as e:
            again.remove_image("marker")
        assert e.value.status == 404


def test_a_tenants_image_is_its_own(base_image: str, tmp_path: Path) -> None:
    """Attack: tenant `evil` tries to use, list and overwrite tenant
    `acme`'s registered image through the same daemon (TCP, each with its
    own key). Templates are keyed by (tenant, name): evil sees none of
    acme's, and its own image of the same name is its own."""
    import os
    import socket
    import subprocess
    import time

    from nanoclaw import NanoClaw, NanoClawError, Sandbox

    nc = os.environ["NANOCLAW_BIN"]
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    keys = {
        t: subprocess.run(
            [nc, "tenant", "add", t, "--data", str(data)], capture_output=True, check=True, text=True
        ).stdout.strip()
        for t in ("acme", "evil")
    }
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    daemon = subprocess.Popen(
        [nc, "serve", "--data", str(data), "--listen", f"tcp:127.0.0.1:{port}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "nanoclaw serve did not listen"
                time.sleep(0.05)
        read = ["python3", "-c", "print(open('/owner').read())"]
        with NanoClaw(url=url, api_key=keys["acme"]) as acme, NanoClaw(url=url, api_key=keys["evil"]) as evil:
            img = acme.register_image(
                name="secret",
                dockerfile="FROM python:3.11-slim\nRUN python3 -c \"open('/owner','w').write('acme')\"\n",
                languages=["python"],
            )
            assert img.reference == "localhost/acme/secret:latest"
            assert acme.run(read, template="secret").stdout == "acme\n"

            assert [i.name for i in evil.images()] == ["base"]
            with pytest.raises(NanoClawError) as e:
                evil.run(read, template="secret")
            assert e.value.status == 404 and "template 'secret' not found" in e.value.message
            with pytest.raises(NanoClawError) as e:
                Sandbox.create(template="secret", client=evil)
            assert e.value.status == 404

            # evil's own "secret" is evil's; acme's stays acme's.
            evil.register_image(
                name="secret",
                dockerfile="FROM python:3.11-slim\nRUN python3 -c \"open('/owner','w').write('evil')\"\n",
                languages=["python"],
            )
            assert evil.run(read, template="secret").stdout == "evil\n"
            assert acme.run(read, template="secret").stdout == "acme\n"
            builds = evil.audit(kind="image_build")
            assert len(builds) == 1 and builds[0]["tenant"] == "evil"
    finally:
        daemon.terminate()
        daemon.wait()
