from setuptools import find_packages, setup

setup(
    name="moma_plugin",
    version="0.1.0",
    description="Modality-aware experts (MoMa), Mixture-of-Depths and MoT for Megatron-Core jobs",
    packages=find_packages(include=["moma_plugin", "moma_plugin.*"]),
    python_requires=">=3.10",
    # torch is pinned by the installer (a CPU wheel here, the cluster's CUDA build elsewhere).
    # megatron-core: the lines CI tests (0.16 on Python 3.11, 0.19 on 3.12; README, "Tested versions");
    # the plugin uses Megatron internals (moma_plugin/megatron_compat.py), so the bound moves only
    # when a new line is tested.
    install_requires=[
        "torch>=2.4", "megatron-core>=0.16.1,<0.20", "numpy", "pyyaml",
        # data pipeline: BPE text tokenizer, k-means image codebook, images bundled in scikit-learn
        "tokenizers>=0.15", "scikit-learn>=1.3", "pillow", "tqdm",
        # training job: TensorBoard event files, loss-vs-FLOPs plots
        "tensorboard", "matplotlib",
    ],
    entry_points={"console_scripts": [
        "moma-preprocess=moma_plugin.data.preprocess:main",
        "moma-pretrain=moma_plugin.pretrain:main",
        "moma-compare=moma_plugin.compare:main",
        "moma-train-aux-routers=moma_plugin.training.aux_routers:main",
        "moma-generate=moma_plugin.training.generate:main",
        "moma-torchrun=moma_plugin.launch:main",
        "moma-convert-checkpoint=moma_plugin.training.convert:main",
        "moma-upcycle=moma_plugin.training.upcycle:main",
    ]},
    extras_require={
        "te": ["transformer-engine[pytorch]"],
        "deepspeed": ["deepspeed>=0.15"],
        # What Megatron-LM's training side (pretrain_gpt.py) imports beyond megatron-core
        "megatron-lm": ["six", "regex", "triton"],
        # tests/test_engines.py: ZeRO 1-3; tests/test_megatron_lm.py: a Megatron-LM checkout
        "test": ["pytest>=7", "pytest-timeout>=2", "deepspeed>=0.15", "six", "regex", "triton"],
    },
)
