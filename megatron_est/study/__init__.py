"""The reproduction study: baseline vs EST vs compute-matched control, over seeds; report and plots."""
