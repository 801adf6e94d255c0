"""A DCGAN-style loop: two models, two Adam optimizers, BCE loss; the discriminator trained on real and
detached fake, then the generator through the discriminator - one training step per iteration."""

from __future__ import annotations

import torch
import torch.nn as nn

from pattern_common import Report, parse, seed

NZ, BATCH = 16, 12


def main() -> None:
    args = parse(__doc__, steps=5)
    seed(args.device)
    report = Report("gan", args)
    dev = args.device
    netG = nn.Sequential(nn.Linear(NZ, 64), nn.BatchNorm1d(64), nn.ReLU(True), nn.Linear(64, 32), nn.Tanh()).to(dev)
    netD = nn.Sequential(nn.Linear(32, 64), nn.LeakyReLU(0.2, inplace=True), nn.Linear(64, 1), nn.Sigmoid()).to(dev)
    criterion = nn.BCELoss()
    optimizerD = torch.optim.Adam(netD.parameters(), lr=2e-4, betas=(0.5, 0.999))
    optimizerG = torch.optim.Adam(netG.parameters(), lr=2e-4, betas=(0.5, 0.999))
    for i in range(args.steps):
        real = torch.randn(BATCH, 32, device=dev).tanh()
        netD.zero_grad()
        label = torch.full((BATCH,), 1.0, device=dev)
        errD_real = criterion(netD(real).view(-1), label)
        errD_real.backward()
        noise = torch.randn(BATCH, NZ, device=dev)
        fake = netG(noise)
        label.fill_(0.0)
        errD_fake = criterion(netD(fake.detach()).view(-1), label)
        errD_fake.backward()
        optimizerD.step()
        netG.zero_grad()
        label.fill_(1.0)
        errG = criterion(netD(fake).view(-1), label)
        errG.backward()
        optimizerG.step()
        report.step(errD_real.item() + errD_fake.item() + errG.item(), BATCH)
    report.write()


if __name__ == "__main__":
    main()
