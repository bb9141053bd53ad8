"""gridvm.host"""
