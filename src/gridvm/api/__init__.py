"""gridvm.api"""
