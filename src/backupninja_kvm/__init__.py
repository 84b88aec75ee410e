"""Live backups of running libvirt/KVM virtual machines for backupninja."""

__version__ = "0.5.0"

# Every file we create carries this tag in its name, so that an administrator
# can tell them apart. The name is no proof of ownership: only a journal (or
# the record of images our pulls made) lets recovery touch a file.
TAG = "bnkvm"
