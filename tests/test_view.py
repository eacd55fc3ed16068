"""`atomuq view`: chemiscope's input built from the key registry, the self-contained page, its checks, and the page
loading in headless Chromium with no network (skipped where chemiscope or chromium is absent)."""

from __future__ import annotations

import fcntl
import gzip
import json
import math
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from html.parser import HTMLParser

import numpy as np
import pytest
from ase.build import molecule
from ase.io import write
from typer.testing import CliRunner

from atomuq.cli.main import app
from atomuq.core.io import Record, read_structures, write_structures
from atomuq.core.schema import REGISTRY, Provenance, write_results

chemiscope = pytest.importorskip("chemiscope")

from atomuq.workflows import view as view_module  # noqa: E402  (needs chemiscope)
from atomuq.workflows.view import COLOR_PERCENTILE, check_scored, view_data  # noqa: E402

runner = CliRunner()
PROVENANCE = Provenance(model="test-model.pt", model_fingerprint="0123456789abcdef")


def scored_molecule(name: str, seed: int, *, reference: bool = True, ltau: bool = False, ensemble: bool = False):
    """A molecule carrying the results `atomuq score` (and ltau score / --ensemble) write, with random values."""
    atoms = molecule(name)
    rng = np.random.default_rng(seed)
    n = len(atoms)
    direct, conservative = rng.normal(size=(n, 3)), rng.normal(size=(n, 3))
    u = np.linalg.norm(direct - conservative, axis=1)
    results = {"energy": -10.0 - seed, "forces": direct, "forces_direct": direct, "forces_conservative": conservative,
               "force_delta_atoms": u, "force_delta": float(np.sqrt((u**2).sum() / (3 * n))),
               "force_delta_max": float(u.max()), "confidence_error_atoms": rng.uniform(0, 1, n),
               "confidence_error": float(rng.uniform()), "source_file": "in.extxyz", "source_index": seed}
    if reference:
        results.update(eps_nc=float(rng.uniform()), eps_c=float(rng.uniform()),
                       eps_nc_atoms=rng.uniform(0, 1, n), eps_c_atoms=rng.uniform(0, 1, n))
    if ltau:
        p = rng.uniform(0, 1, n)
        results.update(ltau_uncertainty_atoms=1 - p, ltau_confidence_atoms=p, ltau_uncertainty=float((1 - p).mean()))
    if ensemble:
        results.update(ensemble_std=float(rng.uniform()), ensemble_std_atoms=rng.uniform(0, 1, n))
    write_results(atoms, results, PROVENANCE)
    atoms.info["molecule"] = name
    return atoms


@pytest.fixture()
def scored_file(tmp_path):
    # the largest U_Δ is the second structure (the page opens on it, not on the first)
    structures = [scored_molecule("CH4", 1, ltau=True, ensemble=True), scored_molecule("H2O", 0, ltau=True, ensemble=True),
                  scored_molecule("NH3", 2, reference=False, ltau=True, ensemble=True)]
    return write_structures(tmp_path / "scored.extxyz", structures)


def records_of(path):
    return read_structures([path])


def test_properties_use_the_registry_names_units_and_descriptions(scored_file):
    records = records_of(scored_file)
    data = view_data(records)
    props = data.dataset["properties"]
    for name in ("force_delta", "force_delta_max", "eps_nc", "eps_c", "ensemble_std", "ltau_uncertainty",
                 "force_delta_atoms", "eps_nc_atoms", "ltau_uncertainty_atoms", "ensemble_std_atoms"):
        key = REGISTRY[name]
        assert props[name]["target"] == key.level, name
        assert props[name]["units"] == key.unit and props[name]["description"].startswith(key.description), name
    # per-structure values in the order of the structures, NaN where a result was not computed (and said so)
    assert props["force_delta"]["values"] == [r.atoms.info["force_delta"] for r in records]
    assert props["eps_nc"]["values"][:2] == [r.atoms.info["eps_nc"] for r in records[:2]]
    assert math.isnan(props["eps_nc"]["values"][2]) and "not computed for 1 of 3" in props["eps_nc"]["description"]
    # per-atom values concatenated over the structures, one per atom
    u = np.concatenate([r.atoms.arrays["force_delta_atoms"] for r in records])
    assert np.allclose(props["force_delta_atoms"]["values"], u)
    assert len(data.dataset["structures"]) == 3 and [s["size"] for s in data.dataset["structures"]] == [5, 3, 4]
    assert len(data.dataset["environments"]) == u.size
    # provenance and text keys never become properties; the label comes from the structure's own info
    assert "atomuq_model" not in props and "md_state" not in props
    assert props["label"]["values"] == ["CH4", "H2O", "NH3"]
    assert "test-model.pt" in data.dataset["meta"]["description"]


def test_settings_map_u_delta_against_eps_nc_and_colour_atoms_by_u_i(scored_file):
    data = view_data(records_of(scored_file))
    settings = data.dataset["settings"]
    assert settings["target"] == "structure"
    assert settings["map"]["x"]["property"] == "force_delta" and settings["map"]["y"]["property"] == "eps_nc"
    colour = settings["structure"][0]["color"]
    u = data.dataset["properties"]["force_delta_atoms"]["values"]
    assert data.color == colour["property"] == "force_delta_atoms"
    assert colour["min"] == 0 and colour["max"] == pytest.approx(np.percentile(u, COLOR_PERCENTILE))
    u_delta = data.dataset["properties"]["force_delta"]["values"]
    assert settings["pinned"] == [int(np.argmax(u_delta))] == [1]  # the page opens on the least trusted structure
    assert set(data.dataset["shapes"]) == {"forces_direct", "forces_conservative"}
    arrows = data.dataset["shapes"]["forces_direct"]["parameters"]["atom"]
    assert len(arrows) == len(u)


def test_color_option_takes_any_per_atom_key_on_every_structure(scored_file):
    records = records_of(scored_file)
    data = view_data(records, color="ltau_uncertainty_atoms")
    assert data.dataset["settings"]["structure"][0]["color"]["property"] == "ltau_uncertainty_atoms"
    with pytest.raises(Exception, match="not a per-atom atomuq result key.*force_delta_atoms"):
        view_data(records, color="force_delta")
    with pytest.raises(Exception, match="has no eps_nc_atoms"):
        view_data(records, color="eps_nc_atoms")


def test_only_per_structure_results_colour_by_element(tmp_path):
    atoms = molecule("H2O")
    write_results(atoms, {"energy": -1.0, "force_delta": 0.2, "step": 3, "time_fs": 1.5}, PROVENANCE)
    data = view_data([Record(atoms, "md.extxyz", 0)])
    assert data.color is None and "color" not in data.dataset["settings"]["structure"][0]
    assert data.dataset["settings"]["map"]["x"]["property"] == "force_delta"
    assert data.dataset["settings"]["pinned"] == [0]


def test_structures_without_results_are_refused_naming_the_file_and_structure(tmp_path):
    plain = tmp_path / "plain.extxyz"
    write(plain, [molecule("H2O")])
    with pytest.raises(Exception, match=r"plain.extxyz structure 0: no atomuq results.*atomuq score"):
        check_scored(records_of(plain))


def test_cli_writes_the_page_and_the_chemiscope_file(scored_file, tmp_path):
    page, data_file = tmp_path / "out" / "view.html", tmp_path / "view.json.gz"
    result = runner.invoke(app, ["view", str(scored_file), "-o", str(page), "--chemiscope", str(data_file)])
    assert result.exit_code == 0, result.output
    text = page.read_text(encoding="utf-8")
    # one self-contained file: chemiscope's viewer inline, no element loads anything, a policy forbidding it
    tags = page_tags(text)
    assert [t for t, _ in tags].count("script") == 3 and "link" not in [t for t, _ in tags]
    assert not [(t, a) for t, a in tags if {"src", "href", "data", "srcset"} & set(a)]
    policy = next(a["content"] for t, a in tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy")
    assert policy.startswith("default-src 'none'") and "connect-src data: blob:" in policy
    assert "Chemiscope.DefaultVisualizer" in text
    assert [p.name for p in page.parent.iterdir()] == ["view.html"]
    with gzip.open(data_file, "rt", encoding="utf-8") as handle:
        dataset = json.load(handle)
    assert len(dataset["structures"]) == 3 and "force_delta" in dataset["properties"]
    assert dataset["settings"]["structure"][0]["color"]["property"] == "force_delta_atoms"
    # the page embeds the same data
    embedded = re.search(r'<script type="application/json" id="atomuq-dataset">(.*?)</script>', text, re.S).group(1)
    assert json.loads(embedded)["properties"]["force_delta"]["values"] == dataset["properties"]["force_delta"]["values"]


def page_tags(text):
    """(tag, attributes) of every element of an HTML page (script contents are not parsed as markup)."""
    tags = []

    class Tags(HTMLParser):
        def handle_starttag(self, tag, attrs):
            tags.append((tag, dict(attrs)))

    Tags().feed(text)
    return tags


def test_cli_refuses_a_file_without_results_and_writes_nothing(tmp_path):
    plain = tmp_path / "plain.extxyz"
    write(plain, [molecule("H2O")])
    page = tmp_path / "view.html"
    result = runner.invoke(app, ["view", str(plain), "-o", str(page)])
    assert result.exit_code == 1
    assert "no atomuq results" in result.output and "atomuq score" in result.output
    assert not page.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["plain.extxyz"]


def test_cli_checks_outputs_before_reading(tmp_path):
    missing = tmp_path / "missing.extxyz"  # never read: the output checks come first
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    cases = {
        (): "give -o",
        ("-o", str(blocker / "view.html")): "is a file, not a folder",
        ("--chemiscope", str(tmp_path / "data.txt")): ".json or .json.gz",
        ("-o", str(tmp_path / "same.json"), "--chemiscope", str(tmp_path / "same.json")): "same file",
        ("-o", str(tmp_path)): "is a directory",
    }
    for flags, message in cases.items():
        result = runner.invoke(app, ["view", str(missing), *flags])
        assert result.exit_code == 1, flags
        assert message in result.output, (flags, result.output)
    result = runner.invoke(app, ["view", str(missing), "-o", str(tmp_path / "v.html")])
    assert result.exit_code == 1 and "file not found" in result.output


def test_cli_unknown_colour_key_is_one_line(scored_file, tmp_path):
    result = runner.invoke(app, ["view", str(scored_file), "-o", str(tmp_path / "v.html"), "--color", "nope"])
    assert result.exit_code == 1 and "--color nope" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "v.html").exists()


def test_a_failed_write_leaves_no_file(scored_file, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(view_module, "viewer_javascript", broken)
    page = tmp_path / "view.html"
    result = runner.invoke(app, ["view", str(scored_file), "-o", str(page)])
    assert result.exit_code == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scored.extxyz"]


def test_page_data_cannot_close_its_script_element():
    text = view_module._json_for_page({"meta": {"name": "</script><script>alert(1)</script>"}, "x": [math.nan, 1.0]})
    assert "<" not in text and ">" not in text
    assert json.loads(text) == {"meta": {"name": "</script><script>alert(1)</script>"}, "x": [None, 1.0]}


# ------------------------------------------------------------------------------------------- in headless Chromium

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,900"]

#: all text of the page, shadow roots included (chemiscope draws its panels in shadow DOM), and what was drawn
PAGE_TEXT_JS = """(() => {
  const texts = []; let canvases = 0;
  const walk = (node) => {
    if (node.shadowRoot) walk(node.shadowRoot);
    for (const child of node.childNodes) {
      if (child.nodeType === 3) texts.push(child.textContent.trim());
      else if (child.nodeType === 1 && !["SCRIPT", "STYLE"].includes(child.tagName)) {
        if (child.tagName === "CANVAS" && child.width > 0 && child.height > 0) canvases += 1;
        if (child.tagName === "INPUT" && child.value) texts.push(child.value);
        walk(child);
      }
    }
  };
  walk(document.body);
  return JSON.stringify({text: texts.filter(t => t).join("\\n"), canvases: canvases});
})()"""


class Chromium:
    """Headless Chromium driven through the DevTools protocol over a pipe (no websocket client needed)."""

    def __init__(self) -> None:
        self._to_r, self._to_w = os.pipe()
        self._from_r, self._from_w = os.pipe()
        to_r, from_w = self._to_r, self._from_w

        def pipes() -> None:  # Chromium reads commands on fd 3 and answers on fd 4 (via high copies: no clobbering)
            high_r, high_w = fcntl.fcntl(to_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self.profile = tempfile.mkdtemp(prefix="atomuq-chromium-")
        self.proc = subprocess.Popen([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-pipe",
                                      "about:blank"], preexec_fn=pipes, close_fds=False, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(to_r)
        os.close(from_w)
        self._buffer = b""
        self._id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 120) -> dict:
        """Send one command and return its result (events met on the way are kept in self.events)."""
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_w, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_r], [], [], left)[0]:
                raise TimeoutError("chromium did not answer")
            chunk = os.read(self._from_r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium exited")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_w)
        os.close(self._from_r)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_page_loads_offline_in_chromium_and_shows_the_structures_and_table(scored_file, tmp_path):
    page = tmp_path / "view.html"
    assert runner.invoke(app, ["view", str(scored_file), "-o", str(page)]).exit_code == 0
    infos = [r.atoms.info for r in records_of(scored_file)]
    shown_first = max(infos, key=lambda info: info["force_delta"])  # the page opens on the largest U_Δ
    browser = Chromium()
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        browser.send("Network.enable", session=session)
        browser.send("Page.navigate", {"url": page.as_uri()}, session=session)
        state, deadline = None, time.monotonic() + 300  # minutes on a loaded machine, seconds on an idle one
        while state not in ("loaded", "failed") and time.monotonic() < deadline:
            time.sleep(1)
            state = browser.send("Runtime.evaluate", {"expression": "document.body && document.body.getAttribute("
                                                      "'data-atomuq-viewer')", "returnByValue": True},
                                 session=session, timeout=300)["result"].get("value")
        shown = json.loads(browser.send("Runtime.evaluate", {"expression": PAGE_TEXT_JS, "returnByValue": True},
                                        session=session, timeout=300)["result"]["value"])
    finally:
        browser.close()
    assert state == "loaded", shown["text"][:2000]
    requested = [e["params"]["request"]["url"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"]
    assert requested and all(url.split(":", 1)[0] in ("file", "data", "blob") for url in requested), requested
    # chemiscope drew the map and the structure (canvases), and its table shows the first structure's values under
    # the registry's names and units (chemiscope prints 4 significant digits)
    assert shown["canvases"] >= 2, shown
    text = shown["text"]
    for name in ("force_delta", "eps_nc", "eps_c", "ltau_uncertainty", "ensemble_std", "confidence_error"):
        unit = REGISTRY[name].unit
        match = re.search(rf"\n{name}/{re.escape(unit)}\n([-+0-9.e]+)\n", text)
        assert match, (name, text[:3000])
        assert float(match.group(1)) == pytest.approx(shown_first[name], rel=2e-3), name
