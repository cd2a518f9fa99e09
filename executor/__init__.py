"""The multiplexed executor: backbone, PEFT methods, data, trainer, export."""
