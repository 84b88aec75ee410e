"""Live backups of running libvirt/KVM virtual machines for backupninja."""

__version__ = "0.2.0"

# Every file we create carries this tag in its name, so that cleanup and
# recovery can recognise their own leftovers and touch nothing else.
TAG = "bnkvm"
