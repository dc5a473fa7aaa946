from .resized_loss import resized_cross_entropy

__all__ = ['resized_cross_entropy']
