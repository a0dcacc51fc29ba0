from setuptools import find_packages, setup

setup(
    name="fairseq-stablemoe",
    version="0.1.0",
    description="StableMoE (Dai et al., ACL 2022) as a fairseq plugin: --user-dir fairseq_stablemoe",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    project_urls={
        "Paper": "https://aclanthology.org/2022.acl-long.489/",
        "fairseq": "https://github.com/facebookresearch/fairseq",
    },
    packages=find_packages(include=["fairseq_stablemoe", "fairseq_stablemoe.*"]),
    package_data={"fairseq_stablemoe": ["config/*.yaml"]},
    # What CI tests. fairseq 0.12.2 (the last PyPI release) does not import on Python >= 3.11 and its
    # omegaconf < 2.1 cannot be resolved by pip >= 24.1, so older Pythons have no installable fairseq here.
    python_requires=">=3.11",
    install_requires=[
        "torch>=1.13",
        # fairseq main with the Python 3.11 fixes; the same `fairseq` module. The plugin subclasses fairseq's
        # models, tasks and trainer hooks: tested with 0.12.3.1, a next minor release may move them
        "fairseq-fixed>=0.12.3.1,<0.13",
        # fairseq's TokenBlockDataset (--sample-break-mode eos/complete, fairseq-eval-lm, the hub's
        # score()/sample()) uses np.compat, which numpy 2 removed
        "numpy>=1.21.3,<2",
    ],
    extras_require={
        "test": ["pytest", "tensorboard", "sacrebleu>=2.0"],  # what tests/ imports or runs
        # fairseq writes --tensorboard-logdir only when it can import torch.utils.tensorboard (needs tensorboard);
        # its speech tasks log "Please install tensorboardX" at every start-up without tensorboardX
        "tensorboard": ["tensorboard", "tensorboardX"],
        "plots": ["matplotlib"],
        # examples/ only: the demo's and translation example's tokenizer, BLEU scoring and figures
        "examples": ["sentencepiece", "sacrebleu>=2.0", "matplotlib"],
    },
    entry_points={
        "console_scripts": [
            "stablemoe-fluctuation = fairseq_stablemoe.analysis.fluctuation:main",
            "stablemoe-expert-tokens = fairseq_stablemoe.analysis.expert_tokens:main",
            "stablemoe-expert-load = fairseq_stablemoe.analysis.expert_load:main",
            "stablemoe-reshard-checkpoint = fairseq_stablemoe.reshard_checkpoint:main",
        ],
    },
    license="MIT",
    license_files=["LICENSE"],
    classifiers=[
        "Development Status :: 4 - Beta",
        "Intended Audience :: Science/Research",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.11",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
