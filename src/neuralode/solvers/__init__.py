"""Steppers: one generic explicit Runge-Kutta stepper (implicit steppers for stiff problems later)."""

from .rk import RKStepper

__all__ = ["RKStepper"]
