"""study: a Ray study runner for interpretable 3D CNNs on brain MRI."""

__version__ = "0.1.0"
