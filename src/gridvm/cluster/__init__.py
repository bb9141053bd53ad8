"""gridvm.cluster"""
