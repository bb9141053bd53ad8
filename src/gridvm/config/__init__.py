"""gridvm.config"""
