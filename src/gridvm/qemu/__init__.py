"""gridvm.qemu"""
