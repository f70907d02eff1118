"""spec.capture: off by default (nothing rendered), on it reaches the server as its --capture-* settings
(read back through the real `fleetserve serve` parser) with one file per pod on the given volume."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import yaml
from fleetserve_operator.api.spec import spec_from_body
from fleetserve_operator.reconcile.fit import check_memory_fit
from fleetserve_operator.resources.server import build_config_map, build_deployment, template_hash
from fleetserve_server.cli.serve import configure
from fleetserve_server.config import build_config
from operator_fixtures import cpu_body
from pydantic import ValidationError


def render(**spec: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    parsed = spec_from_body(cpu_body(**spec))
    fit = check_memory_fit(parsed)
    return build_deployment("m", "ns1", parsed, fit, 1), build_config_map("m", "ns1", parsed, fit)


def server_sees(dep: dict[str, Any], config_map: dict[str, Any], tmp_path: Path, pod: str = "m-abc") -> Any:
    """The ServerConfig the container's command line and server.yaml give (with $(POD_NAME) expanded)."""
    [c] = dep["spec"]["template"]["spec"]["containers"]
    assert c["command"][:2] == ["fleetserve", "serve"]
    config_file = tmp_path / "server.yaml"
    config_file.write_text(config_map["data"]["server.yaml"])
    argv = [a.replace("$(POD_NAME)", pod).replace(c["command"][3], str(config_file)) for a in c["command"][2:]]
    parser = argparse.ArgumentParser()
    configure(parser)
    args = parser.parse_args(argv)
    cli = {k: v for k, v in vars(args).items() if k not in ("handler", "config")}
    return build_config(cli, config_file=args.config, environ={})


def test_off_by_default_renders_nothing(tmp_path: Path) -> None:
    dep, cm = render()
    pod = dep["spec"]["template"]["spec"]
    assert "capture" not in cm["data"]["server.yaml"]
    assert all(v["name"] != "capture" for v in pod["volumes"])
    assert "--capture-path" not in pod["containers"][0]["command"]
    assert server_sees(dep, cm, tmp_path).capture_path is None


def test_capture_reaches_the_server_with_a_file_per_pod_on_the_claim(tmp_path: Path) -> None:
    dep, cm = render(capture={"enabled": True, "fraction": 0.25, "maxFileSize": "10Mi", "maxFiles": 3,
                              "redact": [r"Project\s+\w+"], "defaultRedaction": False,
                              "volume": {"persistentVolumeClaim": {"claimName": "eval-samples"}}})
    pod = dep["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert {"name": "capture", "persistentVolumeClaim": {"claimName": "eval-samples"}} in pod["volumes"]
    assert {"name": "capture", "mountPath": "/var/lib/fleetserve/capture"} in c["volumeMounts"]
    assert any(e["name"] == "POD_NAME" for e in c["env"])  # what $(POD_NAME) expands from
    config = server_sees(dep, cm, tmp_path, pod="m-7d9f-x2")
    assert config.capture_path == "/var/lib/fleetserve/capture/m-7d9f-x2.jsonl"
    assert (config.capture_fraction, config.capture_max_bytes, config.capture_max_files) == (0.25, 10 * 2**20, 3)
    assert config.capture_redact == [r"Project\s+\w+"] and config.capture_default_redaction is False


def test_the_default_volume_is_an_empty_dir_and_turning_it_on_rolls_the_pods(tmp_path: Path) -> None:
    dep, cm = render(capture={"enabled": True})
    assert {"name": "capture", "emptyDir": {}} in dep["spec"]["template"]["spec"]["volumes"]
    config = server_sees(dep, cm, tmp_path)
    assert (config.capture_fraction, config.capture_max_bytes, config.capture_default_redaction) == (
        0.01, 100 * 2**20, True)
    assert template_hash(dep) != template_hash(render()[0])
    host, _ = render(capture={"enabled": True, "volume": {"hostPath": {"path": "/srv/samples"}}})
    assert {"name": "capture", "hostPath": {"path": "/srv/samples", "type": "DirectoryOrCreate"}} \
        in host["spec"]["template"]["spec"]["volumes"]


@pytest.mark.parametrize("capture,message", [
    ({"fraction": 1.5}, "less than or equal to 1"),
    ({"redact": ["("]}, "capture.redact: '(' is not a valid regular expression"),
    ({"redact": ["x*"]}, "matches the empty string"),
    ({"maxFileSize": "100"}, "capture.maxFileSize: 100 is under 1Ki"),
    ({"volume": {"emptyDir": {}, "persistentVolumeClaim": {"claimName": "c"}}}, "set at most one of emptyDir"),
])
def test_bad_capture_settings_are_refused_naming_them(capture: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match="capture") as failure:
        spec_from_body(cpu_body(capture={"enabled": True, **capture}))
    assert message in str(failure.value)


def test_the_rendered_config_is_plain_yaml() -> None:
    _, cm = render(capture={"enabled": True, "redact": ["a+"]})
    data = yaml.safe_load(cm["data"]["server.yaml"])
    assert data["capture_redact"] == ["a+"] and "capture_path" not in data  # the path is per pod: a flag
