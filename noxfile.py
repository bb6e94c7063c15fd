"""Sessions: `nox -s tests` (CPU), `lint`, and on a CUDA machine `gpu` (pytest -m gpu), `bench` (op
benchmarks), `sweep` (op accuracy sweep), `distributed` (DDP / FSDP2 training benchmark under torchrun)."""

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.default_venv_backend = "venv"


def _install(session: nox.Session, extras: str = "dev,trl") -> None:
    # torch first, from the index pip is configured with: a CPU build on a machine whose index serves one (on
    # plain PyPI, add --index-url https://download.pytorch.org/whl/cpu), where a bare torch requirement would
    # pull a multi-GB CUDA build.
    session.install("torch==2.13.0")
    session.install("triton==3.7.1; sys_platform == 'linux'", "-e", f".[{extras}]")


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    _install(session)
    session.run("pytest", "-q", "-m", "not gpu", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    # The dev extra's ruff: a minor release may format differently, and CI runs the same check.
    session.install("ruff>=0.17,<0.18")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", "src", "tests", "bench")


@nox.session(venv_backend="none")
def gpu(session: nox.Session) -> None:
    """On a CUDA machine with torch/triton/transformers already installed."""
    session.env["PYTHONPATH"] = "src"
    session.run("python", "-m", "pytest", "-q", "-m", "gpu", *session.posargs)


@nox.session(venv_backend="none")
def bench(session: nox.Session) -> None:
    """Op benchmarks on a CUDA machine (`bench/train.py` is the training one); results land in bench/out/."""
    session.env["PYTHONPATH"] = "src"
    session.run("python", "bench/ops.py", *session.posargs)


@nox.session(venv_backend="none")
def distributed(session: nox.Session) -> None:
    """DDP / FSDP2 training benchmark under torchrun on a multi-GPU CUDA machine; results in bench/out/.

    `nox -s distributed -- 8 [bench/distributed.py options]`: the first argument is torchrun's
    --nproc-per-node (default: gpu, one rank per visible GPU); `-- 2 --smoke` runs on CPU over gloo.
    """
    args = list(session.posargs)
    nproc = args.pop(0) if args and not args[0].startswith("-") else "gpu"
    session.env["PYTHONPATH"] = "src"
    session.env["NCCL_NVLS_ENABLE"] = "0"
    session.run(
        "python",
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "bench/distributed.py",
        *args,
    )


@nox.session(venv_backend="none")
def sweep(session: nox.Session) -> None:
    """Randomized op accuracy sweep on a CUDA machine, 500 cases per op; results land in bench/out/sweep.*."""
    session.env["PYTHONPATH"] = "src"
    session.run("python", "bench/sweep.py", "--cases", "500", *session.posargs)
