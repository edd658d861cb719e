"""Deploy the OpenAI-compatible Serve app from a Serve config onto the cluster the job runs on, and return:

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/serve_deploy.py serve/config.yaml --model tiny=s3://bucket/exports/NAME

--model NAME=PATH (repeatable) replaces the config's model list, so a fresh export is served without editing the
file. The Serve controller outlives this job: the app keeps running after the job SUCCEEDED; `serve status`
(on the head) or the dashboard's Serve tab shows it, `serve shutdown` removes it. Replicas import llmray from the
nodes' installed package (cluster.yaml's setup installs it), not from the job's working_dir.
"""

import argparse
import os
import subprocess
import sys
import tempfile

import _entry  # noqa: F401  (sys.path: the llmray next to this file)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", help="Serve config YAML, e.g. serve/config.yaml")
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH", help="model to serve (repeatable)")
    args = p.parse_args(argv)
    import yaml  # after the arguments: `--help` answers without loading Ray Serve
    from ray.serve.schema import ServeDeploySchema

    from llmray.serve.app import ServeArgs

    with open(args.config) as f:
        config = yaml.safe_load(f)
    app = next((a for a in config.get("applications", []) if a.get("import_path") == "llmray.serve.app:build_app"),
               None)
    if app is None:
        print(f"llmray: error: {args.config} has no application with import_path llmray.serve.app:build_app",
              file=sys.stderr)
        return 2
    if args.model:
        app["args"]["models"] = [dict(zip(("name", "path"), m.split("=", 1))) for m in args.model]
    try:  # fail here, naming the field, rather than in a replica's log
        ServeDeploySchema.model_validate(config)
        ServeArgs.model_validate(app["args"])
    except Exception as e:
        print(f"llmray: error: {args.config}: {e}", file=sys.stderr)
        return 2
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(config, f, sort_keys=False)
    try:  # `serve run --non-blocking` connects through RAY_ADDRESS (set for jobs) and returns once submitted
        return subprocess.call([sys.executable, "-m", "ray.serve.scripts", "run", "--non-blocking", f.name])
    finally:
        os.unlink(f.name)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
