"""File and format names, in a module that imports nothing heavy (no torch), so that the
CLI and batch bookkeeping (what is done, what to skip) start fast."""

# PEFT folders
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")

# MoS folders (see docs/format.md)
FORMAT_NAME = "mosconv.mos"
FORMAT_VERSION = 1
CONFIG_FILE = "mos_config.json"
TENSOR_FILE = "mos_adapter.safetensors"
REPORT_FILE = "report.json"
