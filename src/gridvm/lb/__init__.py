"""gridvm.lb"""
