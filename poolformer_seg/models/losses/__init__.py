from .resized_cross_entropy import resized_cross_entropy

__all__ = ['resized_cross_entropy']
