"""gridvm.cli"""
