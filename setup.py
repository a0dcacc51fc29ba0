from setuptools import find_packages, setup

setup(
    name="fairseq-stablemoe",
    version="0.1.0",
    description="StableMoE (Dai et al., ACL 2022) as a fairseq plugin: --user-dir fairseq_stablemoe",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fairseq_stablemoe", "fairseq_stablemoe.*"]),
    python_requires=">=3.8",
    install_requires=[
        "torch>=1.13",
        # fairseq 0.12.2 does not import on Python >= 3.11; fairseq-fixed is fairseq main with the fixes
        'fairseq>=0.12.2; python_version < "3.11"',
        'fairseq-fixed>=0.12.3.1; python_version >= "3.11"',
        "sentencepiece",
        "sacrebleu>=2.0",
    ],
    extras_require={"test": ["pytest"], "plots": ["matplotlib"]},
    license="MIT",
)
