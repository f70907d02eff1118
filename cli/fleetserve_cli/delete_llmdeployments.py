"""`fleetserve delete-llmdeployments`: delete LLMDeployments and wait until they are gone.

The Helm chart runs it as a `pre-delete` hook: `helm uninstall` deletes the
operator and the release's LLMDeployments at the same time, and an
LLMDeployment carries the operator's finalizer (kopf's, for the autoscaler
daemon), so without the operator it would hang in Terminating forever. The
hook deletes them first, while the operator still runs to release them.

Exit status 0 when no matching LLMDeployment is left before the deadline, 1
otherwise (naming the ones left).
"""

from __future__ import annotations

import argparse
import sys
import time

GROUP, VERSION, PLURAL = "fleetserve.io", "v1alpha1", "llmdeployments"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--namespace", action="append", required=True, metavar="NS",
                        help="namespace to clean up (repeatable)")
    parser.add_argument("-l", "--selector", required=True,
                        help="label selector of the LLMDeployments to delete (e.g. app.kubernetes.io/instance=REL)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds to wait until they are gone (default: 300)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from kubernetes import client, config  # imported here: `fleetserve --help` stays light

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    api = client.CustomObjectsApi()

    def remaining() -> list[str]:
        names = []
        for ns in args.namespace:
            items = api.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, label_selector=args.selector)
            names += [f"{ns}/{item['metadata']['name']}" for item in items["items"]]
        return names

    for qualified in remaining():
        ns, name = qualified.split("/", 1)
        try:
            api.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
            print(f"deleting LLMDeployment {qualified}")
        except client.ApiException as exc:
            if exc.status != 404:
                raise
    deadline = time.monotonic() + args.timeout
    while left := remaining():
        if time.monotonic() >= deadline:
            print(f"fleetserve delete-llmdeployments: still present after {args.timeout:g}s: {', '.join(left)} "
                  "(is the operator running? it removes their finalizer)", file=sys.stderr)
            return 1
        time.sleep(1.0)
    print("no LLMDeployment left")
    return 0
