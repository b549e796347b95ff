"""genfast.zoo"""
